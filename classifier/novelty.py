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

Every image also gets the turn check, on the image as the model reads it: a picture has no header to
say which way is up, and a DICOM image may have no Patient Orientation or a wrong one. The same features
say which way is up. A :class:`TurnProbe`, a multinomial logistic regression fitted on the training images
at their four quarter turns (clean and degraded, like the density), names the turn an image was given. On
the shipped model it names the turn of all 704 validation images at their four turns; after JPEG,
down-sampling, noise or a crop the check still refuses 173–176 of 176 turned pictures and no upright one
(``benchmarks/orientation.py``; the model card has the figures). An
image it calls turned is scored once more, turned back; only when that is familiar does
:attr:`Prediction.better_turn` say the image is the wrong way up (:func:`better_turn`). A photograph is
unfamiliar whichever way it is turned: it is not. The probe reads the features already computed for the
prediction, so an upright image costs nothing more, and a turned one one forward pass.

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
TURN_PROBE_FILE = "turn_probe.npz"
# Softmax regression on standardised features: weight decay and full-batch gradient steps. On the shipped
# model 300 steps already name the turn of every validation image; 1,000 take about a minute there.
TURN_L2 = 0.01
TURN_STEPS = 1000
TURN_RATE = 0.1
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
class TurnProbe:
    """Which way is up, from the model's features: a softmax regression over the four quarter turns.

    Column ``k`` of :meth:`probabilities` is for an image that is an upright one turned ``k`` quarter turns
    anticlockwise (``numpy.rot90`` with ``k``); :meth:`turns_back` is what turns it head up again.
    """

    mean: Floats  # d, the features' mean over the fitting images
    scale: Floats  # d, their standard deviation
    weights: Floats  # d × 4
    bias: Floats  # 4

    def probabilities(self, features: npt.ArrayLike) -> Floats:
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != len(self.mean):
            raise ValueError(f"features have {x.shape[1]} dimensions, the turn probe {len(self.mean)}")
        return _softmax(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def turns_back(self, features: npt.ArrayLike) -> list[int]:
        """Anticlockwise quarter turns (0–3) that bring each image head up, by the most probable turn."""
        return [int((4 - k) % 4) for k in np.argmax(self.probabilities(features), axis=1)]

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            weights=self.weights.astype(np.float32),
            bias=self.bias.astype(np.float32),
        )

    @classmethod
    def load(cls, path: Path) -> TurnProbe:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key].astype(np.float64) for key in ("mean", "scale", "weights", "bias")}
            probe = cls(**arrays)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelArtifactError(f"{path.name} is not a turn probe: {type(exc).__name__}") from exc
        d = len(probe.mean)
        if probe.scale.shape != (d,) or probe.weights.shape != (d, 4) or probe.bias.shape != (4,):
            raise ModelArtifactError(f"{path.name} has inconsistent shapes")
        if not np.all(probe.scale > 0):
            raise ModelArtifactError(f"{path.name} has a non-positive feature scale")
        return probe


def _softmax(logits: Floats) -> Floats:
    shifted: Floats = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float64)


def fit_turn_probe(
    features: npt.ArrayLike,
    turns: Sequence[int] | npt.NDArray[np.int64],
    *,
    l2: float = TURN_L2,
    steps: int = TURN_STEPS,
    rate: float = TURN_RATE,
) -> TurnProbe:
    """Softmax regression of ``turns`` (0–3, anticlockwise quarter turns given to an upright image) on the
    standardised ``features``, by full-batch gradient descent from zero (deterministic)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(turns, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or not np.isin(y, range(4)).all():
        raise ValueError("fit_turn_probe needs an N×d feature matrix and N turns in 0–3")
    if len(np.unique(y)) != 4:
        raise ValueError("fit_turn_probe needs images at all four turns")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    standard = (x - mean) / scale
    targets = np.eye(4)[y]
    weights = np.zeros((x.shape[1], 4))
    bias = np.zeros(4)
    for _ in range(steps):
        gradient = (_softmax(standard @ weights + bias) - targets) / len(x)
        weights -= rate * (standard.T @ gradient + l2 * weights)
        bias -= rate * gradient.sum(axis=0)
    return TurnProbe(mean=mean, scale=scale, weights=weights, bias=bias)


@dataclass(frozen=True)
class NoveltyCheck:
    """A fitted density, the score above which an image is unfamiliar, and the probe of which way is up
    (``None`` in an artifact fitted before it: no turn check until ``cxr-node novelty`` is run again)."""

    density: FeatureDensity
    threshold: float
    probe: TurnProbe | None = None

    def ratios(self, features: npt.ArrayLike) -> Floats:
        """Score ÷ threshold per row: above 1.0 the image is unlike the training images."""
        return self.density.score(features) / self.threshold

    @classmethod
    def load(cls, folder: Path, record: Mapping[str, Any]) -> NoveltyCheck:
        """The check an artifact records in the ``novelty`` entry of its model.json."""
        threshold = float(record.get("threshold", 0.0))
        if not threshold > 0:
            raise ModelArtifactError("the novelty threshold in model.json must be positive")
        density = FeatureDensity.load(_recorded_file(folder, record, NOVELTY_FILE))
        probe_record = record.get("turn_probe")
        probe = None
        if probe_record:
            probe = TurnProbe.load(_recorded_file(folder, probe_record, TURN_PROBE_FILE))
        if probe is not None and len(probe.mean) != density.means.shape[1]:
            raise ModelArtifactError("the turn probe and the novelty density read different features")
        return cls(density, threshold, probe)


def _recorded_file(folder: Path, record: Mapping[str, Any], default: str) -> Path:
    """A file model.json names, checked against the sha256 recorded with it."""
    from classifier.artifact import sha256_file

    path = Path(folder) / str(record.get("file", default))
    if not path.is_file():
        raise ModelArtifactError(f"model.json names {path.name}, which is not in {folder}")
    if record.get("sha256") and sha256_file(path) != record["sha256"]:
        raise ModelArtifactError(f"{path.name} does not match the sha256 recorded in model.json")
    return path


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
    ``novelty.npz``, ``turn_probe.npz`` and the ``novelty`` entry of model.json, and return that entry.

    The density sees the training split, clean and after each of ``degradations``; the threshold is
    the ``quantile`` of the validation split's scores, so about ``1 − quantile`` of images like the
    validation images are called unfamiliar by design. The turn probe sees the same images at their four
    quarter turns (the model input turned, which is what the turned image's input is) and is scored on the
    validation split's, which it never saw.
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

    def embed_turns(paths: Sequence[Path], degradation: str) -> npt.NDArray[np.float32]:
        """N × 4 × d: the features of each image turned 0–3 quarter turns anticlockwise."""
        rows, step = [], max(batch // 4, 1)
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            inputs = _degraded_inputs(chunk, degradation, classifier.spec, classifier.lungs)
            turned = [np.ascontiguousarray(np.rot90(image, k)) for image in inputs for k in range(4)]
            rows.append(classifier.embed(turned).reshape(len(inputs), 4, -1))
        return np.concatenate(rows)

    train_paths = [item.path for item in train]
    train_labels = np.array([classes.index(item.label) for item in train], dtype=np.int64)
    versions = ["none", *degradations]
    features = []
    for degradation in versions:
        LOGGER.info("novelty: features of %d training images at 4 turns (%s)", len(train_paths), degradation)
        features.append(embed_turns(train_paths, degradation))
    every = np.concatenate(features)  # (versions · N) × 4 × d
    density = fit_density(every[:, 0], np.tile(train_labels, len(versions)), rank=rank, shrinkage=shrinkage)
    LOGGER.info("novelty: turn probe on %d turned images", every.shape[0] * 4)
    probe = fit_turn_probe(every.reshape(-1, every.shape[2]), np.tile(np.arange(4), every.shape[0]))
    held_out = embed_turns([item.path for item in validation], "none")
    validation_scores = density.score(held_out[:, 0])
    threshold = float(np.quantile(validation_scores, quantile))
    named = np.array([probe.turns_back(row) for row in held_out])  # N × 4, the turn back at each turn
    path, probe_path = folder / NOVELTY_FILE, folder / TURN_PROBE_FILE
    density.save(path)
    probe.save(probe_path)
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
        "turn_probe": {
            "method": "softmax regression of the quarter turn on the standardised features, fitted on the "
            "training images above at their four turns",
            "file": TURN_PROBE_FILE,
            "sha256": sha256_file(probe_path),
            "l2": TURN_L2,
            "steps": TURN_STEPS,
            "validation": {
                "images": len(validation),
                "turns_named_right": float(np.mean(named == (4 - np.arange(4)) % 4)),
                "upright_called_turned": int(np.sum(named[:, 0] != 0)),
            },
        },
    }
    write_metadata(folder, replace(metadata, novelty=record))
    return record


def better_turn(turn_back: int, novelty_turned_back: float) -> int:
    """The anticlockwise quarter turns (1–3) that bring an image head up, when the turn probe names one
    (``turn_back``) and the image is familiar once turned that way (``novelty_turned_back`` within the
    limit); 0 otherwise. A chest radiograph on its side is unfamiliar as given and familiar turned back: it
    is the wrong way up. A photograph is unfamiliar whichever way it is turned: it is not."""
    if not 0 <= turn_back <= 3:
        raise ValueError("a turn back is 0–3 quarter turns")
    return turn_back if turn_back and novelty_turned_back <= NOVELTY_LIMIT else 0
