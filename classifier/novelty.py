"""Is an image like the ones the model was trained on? A density of the model's own features.

A classifier answers for anything it is given: a lower leg comes out *normal*, a photograph *covid*. The
header check of the node (body part, view, modality) catches what is labelled as not a chest; this
catches what *looks* unlike one, whatever its header says, and PNG/JPEG uploads that have no header.

The method is the one of Lee et al. (NeurIPS 2018): class-conditional Gaussians with one shared
covariance over the input of the softmax layer. The score of features ``x`` is the smallest squared
Mahalanobis distance to a class mean::

    score(x) = min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c)

With about 700 training images and 1,000+ feature dimensions the sample covariance ``C`` is singular,
so it is shrunk towards the identity, ``Σ = s·τ·I + (1 − s)·U Λ Uᵀ`` (``τ`` the mean variance, ``U Λ Uᵀ``
the leading ``rank`` eigenpairs of ``C``). By Woodbury, ``Σ⁻¹ = (I − U diag(w) Uᵀ) / (s·τ)`` with
``w = (1 − s)λ / ((1 − s)λ + s·τ)``, so only the means, ``U`` and ``w`` are stored (about 0.4 MB).

The density is fitted on the training split, clean and after the degradations another hospital's
pipeline applies (so a re-encoded or down-sampled radiograph stays familiar), and its threshold is a
quantile of the scores of the validation split, which it never saw. :attr:`Prediction.novelty` is the
score divided by that threshold: above 1 the image is *unfamiliar*.

An image whose header does not say which way is up (a picture; DICOM without a head–foot Patient
Orientation) is also scored turned by each quarter turn. On the shipped model the upright image is the
most familiar of its four turns for 165 of 176 validation images, so when a turn is clearly more familiar
than the image as given (:func:`better_turn`, :data:`TURN_MARGIN`) the image is taken to be the wrong way
up and :attr:`Prediction.better_turn` says by how much.

The check is only as good as the network's features: on one of four EfficientNet-Lite2 fold models it
let a lower-leg radiograph through. Measure it for every model with ``benchmarks/novelty.py`` (the
model card has the figures), and keep the node's header check in front of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier.errors import ModelArtifactError
from classifier.types import NOVELTY_LIMIT

LOGGER = logging.getLogger(__name__)

NOVELTY_FILE = "novelty.npz"
DEFAULT_RANK = 64
DEFAULT_SHRINKAGE = 0.5
DEFAULT_QUANTILE = 0.99
# A turned version must score below this fraction of the image as given to say "the wrong way up". On the
# shipped model's validation images: 4 of 176 upright ones flagged or refused, against 2 by novelty alone;
# upside down 140 caught against 84, sideways 160 and 154 against 123 and 95.
TURN_MARGIN = 0.8
# What other pipelines do to a radiograph (classifier.evaluation degradations), applied to the training
# images the density is fitted on. Other parameters than the robustness benchmark's, so that benchmark
# measures images the density has not seen.
FIT_DEGRADATIONS = (
    "downscale:0.3",
    "downscale:0.5",
    "jpeg:25+downscale:0.6",
    "noise:0.04",
    "gamma:0.7+crop:0.8",
    "pad:0.1+jpeg:50",
)

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureDensity:
    """Class means and a shrunk, low-rank shared covariance of feature vectors."""

    means: Floats  # classes × d
    basis: Floats  # d × rank, orthonormal columns
    weights: Floats  # rank, in [0, 1)
    isotropic: float  # s·τ, the variance every direction keeps

    def score(self, features: npt.ArrayLike) -> Floats:
        """Smallest squared Mahalanobis distance of each row of ``features`` to a class mean."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"features have {x.shape[1]} dimensions, the density {self.means.shape[1]}")
        best = np.full(len(x), np.inf)
        for mean in self.means:
            centred = x - mean
            projected = centred @ self.basis
            distance = (np.einsum("ij,ij->i", centred, centred) - (projected**2) @ self.weights) / self.isotropic
            best = np.minimum(best, distance)
        return best

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            means=self.means.astype(np.float32),
            basis=self.basis.astype(np.float32),
            weights=self.weights.astype(np.float32),
            isotropic=np.float64(self.isotropic),
        )

    @classmethod
    def load(cls, path: Path) -> FeatureDensity:
        try:
            with np.load(path, allow_pickle=False) as data:
                density = cls(
                    means=data["means"].astype(np.float64),
                    basis=data["basis"].astype(np.float64),
                    weights=data["weights"].astype(np.float64),
                    isotropic=float(data["isotropic"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ModelArtifactError(f"{path.name} is not a feature density: {type(exc).__name__}") from exc
        if density.basis.shape != (density.means.shape[1], len(density.weights)) or density.isotropic <= 0:
            raise ModelArtifactError(f"{path.name} has inconsistent shapes")
        return density


def fit_density(
    features: npt.ArrayLike,
    labels: Sequence[int] | npt.NDArray[np.int64],
    *,
    rank: int = DEFAULT_RANK,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> FeatureDensity:
    """Class means and the shrunk shared covariance of the residuals (``labels`` index the classes)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError("fit_density needs an N×d feature matrix and N labels, N ≥ 2")
    if not 0.0 < shrinkage <= 1.0 or rank < 1:
        raise ValueError("shrinkage must be in (0, 1] and rank ≥ 1")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    residuals = np.concatenate([x[y == c] - means[i] for i, c in enumerate(classes)])
    covariance = residuals.T @ residuals / len(residuals)
    mean_variance = float(np.trace(covariance)) / covariance.shape[0]
    if mean_variance <= 0:
        raise ValueError("the features do not vary")
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    keep = min(rank, len(eigenvalues))
    eigenvalues = np.clip(eigenvalues[::-1][:keep], 0.0, None)
    basis = eigenvectors[:, ::-1][:, :keep]
    isotropic = shrinkage * mean_variance
    weights = (1.0 - shrinkage) * eigenvalues / ((1.0 - shrinkage) * eigenvalues + isotropic)
    return FeatureDensity(means=means, basis=basis, weights=weights, isotropic=isotropic)


@dataclass(frozen=True)
class NoveltyCheck:
    """A fitted density and the score above which an image is unfamiliar."""

    density: FeatureDensity
    threshold: float

    def ratios(self, features: npt.ArrayLike) -> Floats:
        """Score ÷ threshold per row: above 1.0 the image is unlike the training images."""
        return self.density.score(features) / self.threshold

    @classmethod
    def load(cls, folder: Path, record: Mapping[str, Any]) -> NoveltyCheck:
        """The check an artifact records in the ``novelty`` entry of its model.json."""
        from classifier.artifact import sha256_file

        path = Path(folder) / str(record.get("file", NOVELTY_FILE))
        if not path.is_file():
            raise ModelArtifactError(f"model.json names {path.name}, which is not in {folder}")
        if record.get("sha256") and sha256_file(path) != record["sha256"]:
            raise ModelArtifactError(f"{path.name} does not match the sha256 recorded in model.json")
        threshold = float(record.get("threshold", 0.0))
        if not threshold > 0:
            raise ModelArtifactError("the novelty threshold in model.json must be positive")
        return cls(FeatureDensity.load(path), threshold)


def _degraded_inputs(
    paths: Sequence[Path], degradation: str, spec: Any, lungs: Any
) -> list[npt.NDArray[np.float32]]:
    """Model inputs of files after a degradation of :mod:`classifier.evaluation` ("none": as they are)."""
    from PIL import Image

    from classifier.dataset import load_gray
    from classifier.evaluation import parse_degradation
    from classifier.inference import load_input
    from classifier.preprocess import image_to_model_input

    degrade = parse_degradation(degradation)
    if degrade is None:
        return [load_input(path, spec, lungs) for path in paths]
    inputs = []
    for path in paths:
        grey = Image.fromarray((np.clip(load_gray(path), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
        inputs.append(image_to_model_input(degrade(grey), spec, lungs))
    return inputs


def fit_novelty(
    model: Path,
    data: Path,
    *,
    rank: int = DEFAULT_RANK,
    shrinkage: float = DEFAULT_SHRINKAGE,
    quantile: float = DEFAULT_QUANTILE,
    degradations: Sequence[str] = FIT_DEGRADATIONS,
    batch: int = 32,
) -> dict[str, Any]:
    """Fit the novelty check of an artifact on the split recorded in its model.json; write
    ``novelty.npz`` and the ``novelty`` entry of model.json, and return that entry.

    The density sees the training split, clean and after each of ``degradations``; the threshold is
    the ``quantile`` of the validation split's scores, so about ``1 − quantile`` of images like the
    validation images are called unfamiliar by design.
    """
    from dataclasses import replace

    from classifier.artifact import read_metadata, sha256_file, write_metadata
    from classifier.dataset import load_collection, split_from_record
    from classifier.inference import Classifier

    if not 0.5 <= quantile < 1.0:
        raise ValueError("the quantile must be in [0.5, 1)")
    folder = Path(model)
    metadata = read_metadata(folder)
    classifier = Classifier.load(folder)
    train, validation = split_from_record(load_collection(data), metadata.data.get("split", {}))
    classes = metadata.classes

    def embed(paths: Sequence[Path], degradation: str) -> npt.NDArray[np.float32]:
        rows = [
            classifier.embed(
                _degraded_inputs(paths[start : start + batch], degradation, classifier.spec, classifier.lungs)
            )
            for start in range(0, len(paths), batch)
        ]
        return np.concatenate(rows)

    train_paths = [item.path for item in train]
    train_labels = np.array([classes.index(item.label) for item in train], dtype=np.int64)
    versions = ["none", *degradations]
    features = []
    for degradation in versions:
        LOGGER.info("novelty: features of %d training images (%s)", len(train_paths), degradation)
        features.append(embed(train_paths, degradation))
    density = fit_density(
        np.concatenate(features), np.tile(train_labels, len(versions)), rank=rank, shrinkage=shrinkage
    )
    validation_scores = density.score(embed([item.path for item in validation], "none"))
    threshold = float(np.quantile(validation_scores, quantile))
    path = folder / NOVELTY_FILE
    density.save(path)
    record: dict[str, Any] = {
        "method": "class-conditional Gaussian, shared shrunk covariance, of the softmax layer's input "
        "(Lee et al. 2018); novelty = min squared Mahalanobis distance / threshold",
        "file": NOVELTY_FILE,
        "sha256": sha256_file(path),
        "features": int(density.means.shape[1]),
        "rank": int(density.basis.shape[1]),
        "shrinkage": shrinkage,
        "fitted_on": {"train_images": len(train_paths), "degradations": list(degradations)},
        "threshold": threshold,
        "quantile": quantile,
        "validation": {
            "images": len(validation),
            "median_ratio": float(np.median(validation_scores) / threshold),
            "max_ratio": float(np.max(validation_scores) / threshold),
            "unfamiliar": int(np.sum(validation_scores > threshold)),
        },
    }
    write_metadata(folder, replace(metadata, novelty=record))
    return record


def better_turn(as_given: float, turned: Sequence[float], margin: float = TURN_MARGIN) -> int:
    """Counter-clockwise quarter turns (1–3) under which an image is clearly more familiar than as given
    and familiar (novelty within the limit), from its novelty as given and turned by 1, 2 and 3 quarter
    turns; 0 when none is. A chest radiograph on its side is unfamiliar as given and familiar turned: it is
    the wrong way up. A photograph is unfamiliar whichever way it is turned: it is not."""
    if len(turned) != 3:
        raise ValueError("expected the novelty of three turns")
    best = int(np.argmin(turned))
    return best + 1 if turned[best] < margin * as_given and turned[best] <= NOVELTY_LIMIT else 0
