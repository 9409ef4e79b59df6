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

Every image also gets the turn and negative checks, on the image as the model reads it: a picture has no
header to say which way is up or which polarity it has, and a DICOM image may have no Patient Orientation, a
wrong one, or a lost MONOCHROME1 label. The same features say how the image is presented. A
:class:`LinearProbe` over the eight :data:`PRESENTATIONS` (four quarter turns, each as it is or inverted),
fitted on the training images in all eight (clean and degraded, like the density), names the presentation of
an image. One probe for both, so that an upside-down image is not taken for a negative nor a negative for an
upside-down image, which two separate probes did. On the shipped model it names the presentation of every
validation image at its four turns, and of 97.7–100 % of them inverted (``benchmarks/orientation.py`` and the
model card have the figures). An image it calls other than as trained is scored once more, undone
(:class:`Presentation`); only when that is familiar (:func:`confirmed`) do :attr:`Prediction.better_turn` and
:attr:`Prediction.negative` say so. When it is unfamiliar undone, the image is unlike the training images both
ways, and its novelty is the larger of the two scores: a photograph, whichever way it is turned, and an image
the density alone would have let through although the probe sees it is not presented as trained. The probe
reads the features already computed for the prediction, so an image as trained costs nothing more, and any
other one forward pass.

The check is only as good as the network's features: on one of four EfficientNet-Lite2 fold models it
let a lower-leg radiograph through. Measure it for every model with ``benchmarks/novelty.py`` (the
model card has the figures), and keep the node's header check in front of it.
"""

from __future__ import annotations

import logging
import math
import zipfile
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
PRESENTATION_PROBE_FILE = "presentation_probe.npz"
# How an image can be presented to the model: turned 0–3 quarter turns anticlockwise, as it is or inverted.
# Class ``turn + 4 · inverted`` of the presentation probe.
PRESENTATIONS = 8
# The probe is a softmax regression on standardised features with weight decay, solved to a small gradient.
PROBE_L2 = 0.01
PROBE_STEPS = 5000  # at most; it stops once the gradient is below the tolerance
PROBE_TOLERANCE = 1e-5
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
                    isotropic=float(data["isotropic"].item()),  # one number, not an array of one
                )
        except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            # TypeError, AttributeError: a .npy array saved under the name, not an archive of arrays
            raise ModelArtifactError(f"{path.name} is not a feature density: {type(exc).__name__}") from exc
        means, basis, weights = density.means, density.basis, density.weights
        if means.ndim != 2 or weights.ndim != 1 or basis.shape != (means.shape[1], len(weights)):
            raise ModelArtifactError(f"{path.name} has inconsistent shapes")
        arrays = (means, basis, weights, np.float64(density.isotropic))
        if not all(np.isfinite(array).all() for array in arrays):  # NaN scores: no image ever unfamiliar
            raise ModelArtifactError(f"{path.name} holds values that are not finite numbers")
        if density.isotropic <= 0 or not np.all((weights >= 0) & (weights < 1)):
            # a weight of 1 or more made distances negative: no image was ever unfamiliar
            raise ModelArtifactError(f"{path.name}: the variance kept is not positive in every direction")
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
class LinearProbe:
    """A softmax regression over ``k`` classes on standardised features: what the model's features say about
    how an image was given (its quarter turn; whether it is a negative)."""

    mean: Floats  # d, the features' mean over the fitting images
    scale: Floats  # d, their standard deviation
    weights: Floats  # d × k
    bias: Floats  # k

    def probabilities(self, features: npt.ArrayLike) -> Floats:
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != len(self.mean):
            raise ValueError(f"features have {x.shape[1]} dimensions, the probe {len(self.mean)}")
        return _softmax(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def most_probable(self, features: npt.ArrayLike) -> list[int]:
        return [int(k) for k in np.argmax(self.probabilities(features), axis=1)]

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            weights=self.weights.astype(np.float32),
            bias=self.bias.astype(np.float32),
        )

    @classmethod
    def load(cls, path: Path, classes: int) -> LinearProbe:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key].astype(np.float64) for key in ("mean", "scale", "weights", "bias")}
            probe = cls(**arrays)
        except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            raise ModelArtifactError(f"{path.name} is not a feature probe: {type(exc).__name__}") from exc
        d = len(probe.mean) if probe.mean.ndim == 1 else -1
        shapes = (probe.scale.shape, probe.weights.shape, probe.bias.shape)
        if d < 0 or shapes != ((d,), (d, classes), (classes,)):
            raise ModelArtifactError(f"{path.name} has inconsistent shapes (expected {classes} classes)")
        if not np.all(probe.scale > 0):
            raise ModelArtifactError(f"{path.name} has a non-positive feature scale")
        fitted = (probe.mean, probe.scale, probe.weights, probe.bias)
        if not all(np.isfinite(array).all() for array in fitted):
            raise ModelArtifactError(f"{path.name} holds values that are not finite numbers")
        return probe


def _softmax(logits: Floats) -> Floats:
    shifted: Floats = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float64)


def fit_probe(
    features: npt.ArrayLike,
    labels: Sequence[int] | npt.NDArray[np.int64],
    classes: int,
    *,
    l2: float = PROBE_L2,
    steps: int = PROBE_STEPS,
    tolerance: float = PROBE_TOLERANCE,
) -> LinearProbe:
    """Softmax regression of ``labels`` (0 … ``classes`` − 1, every one present) on the standardised
    ``features``: the minimum of the mean cross-entropy plus ``l2``/2 · ‖weights‖² (the bias is not
    penalised), from zero, deterministic.

    The objective is convex and its gradient Lipschitz with L = ½ · λmax(ZᵀZ/N) + ``l2`` (Z the standardised
    features with a column of ones; the softmax Jacobian is at most ½). Plain gradient descent with a fixed
    step does not converge once that step exceeds 2/L, and standardised features of a network are strongly
    correlated (λmax 112–175 for the shipped model's 1,472), so the step is 1/L, with Nesterov's momentum
    restarted whenever it points uphill (O'Donoghue & Candès 2015), until the gradient's largest entry is
    below ``tolerance`` or after ``steps`` steps."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or not np.isin(y, range(classes)).all():
        raise ValueError(f"fit_probe needs an N×d feature matrix and N labels in 0–{classes - 1}")
    if len(np.unique(y)) != classes:
        raise ValueError(f"fit_probe needs examples of all {classes} classes")
    if steps < 1:
        raise ValueError("fit_probe needs at least one step")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])  # the last row of ``w`` is the bias
    targets = np.eye(classes)[y]
    decay = np.full((design.shape[1], 1), l2)
    decay[-1] = 0.0

    def gradient(w: Floats) -> Floats:
        residual = (_softmax(design @ w) - targets) / len(x)
        return np.asarray(design.T @ residual + decay * w, dtype=np.float64)

    step = 1.0 / (0.5 * _largest_eigenvalue(design) + l2)
    w = ahead = np.zeros((design.shape[1], classes))
    momentum, done = 1.0, 0
    slope = gradient(ahead)
    while np.abs(slope).max() >= tolerance and done < steps:
        following = ahead - step * slope
        if float(np.sum(slope * (following - w))) > 0:  # the momentum carried it uphill: start it again
            momentum = 1.0
        next_momentum = (1.0 + np.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
        ahead = following + ((momentum - 1.0) / next_momentum) * (following - w)
        w, momentum, done = following, next_momentum, done + 1
        slope = gradient(ahead)
    if np.abs(slope).max() >= tolerance:
        LOGGER.warning(
            "probe: gradient %.1e after %d steps (tolerance %.0e)", np.abs(slope).max(), done, tolerance
        )
    LOGGER.info("probe: %d steps, %d images, %d features", done, len(x), x.shape[1])
    return LinearProbe(mean=mean, scale=scale, weights=ahead[:-1], bias=ahead[-1])


def _largest_eigenvalue(design: Floats, iterations: int = 100) -> float:
    """λmax of designᵀ·design / N by power iteration, plus 1 % (the iteration approaches it from below; a step
    from a slightly low estimate is still well under 2/L, where gradient descent converges)."""
    vector = np.ones(design.shape[1]) / np.sqrt(design.shape[1])
    value = 0.0
    for _ in range(iterations):
        image = design.T @ (design @ vector) / len(design)
        value = float(np.linalg.norm(image))
        vector = image / value
    return 1.01 * value


@dataclass(frozen=True)
class Presentation:
    """What brings an image back to how the model was trained: anticlockwise quarter turns, then whether
    to invert it (it is a negative)."""

    turn_back: int = 0
    negative: bool = False

    @property
    def as_trained(self) -> bool:
        return self.turn_back == 0 and not self.negative

    def undo(self, gray: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``gray`` presented as the model was trained: inverted back if a negative, then turned back."""
        from classifier.preprocess import upright

        return upright(1.0 - gray if self.negative else gray, self.turn_back)


def presentations(probe: LinearProbe, features: npt.ArrayLike) -> list[Presentation]:
    """By the presentation probe (class ``k + 4·i``: an image as trained turned ``k`` quarter turns
    anticlockwise, as ``numpy.rot90``, and inverted when ``i``), what undoes each image's presentation."""
    return [Presentation(turn_back=(4 - c % 4) % 4, negative=c >= 4) for c in probe.most_probable(features)]


@dataclass(frozen=True)
class NoveltyCheck:
    """A fitted density, the score above which an image is unfamiliar, and the probe of how an image is
    presented, turned or inverted (``None`` in an artifact fitted before it: the turn and negative checks
    are off until ``cxr-node novelty`` is run again)."""

    density: FeatureDensity
    threshold: float
    probe: LinearProbe | None = None

    def ratios(self, features: npt.ArrayLike) -> Floats:
        """Score ÷ threshold per row: above 1.0 the image is unlike the training images."""
        return self.density.score(features) / self.threshold

    @classmethod
    def load(cls, folder: Path, record: Mapping[str, Any]) -> NoveltyCheck:
        """The check an artifact records in the ``novelty`` entry of its model.json."""
        value = record.get("threshold")
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # "2.5" and true were read
            raise ModelArtifactError("the novelty threshold in model.json is not a number")
        try:
            threshold = float(value)
        except OverflowError:  # an integer past float's range (10**400) escaped as itself
            threshold = math.inf
        if not (math.isfinite(threshold) and threshold > 0):
            raise ModelArtifactError("the novelty threshold in model.json must be positive and finite")
        density = FeatureDensity.load(_recorded_file(folder, record, NOVELTY_FILE))
        entry = record.get("presentation_probe")  # absent, null or {}: fitted before the probe existed
        if entry is not None and not isinstance(entry, Mapping):  # [], false, 0 or "" turned the checks off
            raise ModelArtifactError("the presentation_probe entry in model.json is not an object")
        probe = None
        if entry:
            probe = LinearProbe.load(_recorded_file(folder, entry, PRESENTATION_PROBE_FILE), PRESENTATIONS)
            if len(probe.mean) != density.means.shape[1]:
                raise ModelArtifactError("the presentation probe and the density read different features")
        return cls(density, threshold, probe)


def _recorded_file(folder: Path, record: Mapping[str, Any], default: str) -> Path:
    """A file model.json names, checked against the sha256 recorded with it."""
    from classifier.artifact import sha256_file

    name = str(record.get("file", default))
    if Path(name).name != name or name in ("", ".", ".."):  # the artifact is one self-contained folder
        raise ModelArtifactError(f"model.json names {name!r} for its checks: not a file name in {folder}")
    path = Path(folder) / name
    if not path.is_file():
        raise ModelArtifactError(f"model.json names {path.name}, which is not in {folder}")
    if not record.get("sha256"):  # fit_novelty records it; without it a swapped file would go unnoticed
        raise ModelArtifactError(f"model.json records no sha256 for {path.name}")
    if sha256_file(path) != str(record["sha256"]).lower():  # tools also print a digest in upper case
        raise ModelArtifactError(f"{path.name} does not match the sha256 recorded in model.json")
    return path


def _degraded_grays(
    paths: Sequence[Path], degradation: str, min_side: int
) -> list[npt.NDArray[np.float32]]:
    """Grey images of files as inference reads them (a DICOM image reduced for ``min_side``, the model's
    input size), after a degradation of :mod:`classifier.evaluation` ("none": as they are)."""
    from PIL import Image

    from classifier.dataset import load_gray, named_failure
    from classifier.evaluation import parse_degradation
    from classifier.preprocess import gray_to_uint8, pil_to_gray

    degrade = parse_degradation(degradation)
    grays = []
    for path in paths:
        with named_failure(path):
            grays.append(load_gray(path, min_side=min_side))
    if degrade is None:
        return grays
    return [pil_to_gray(degrade(Image.fromarray(gray_to_uint8(gray)))) for gray in grays]


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
    ``novelty.npz``, ``presentation_probe.npz`` and the ``novelty`` entry of model.json, and return that
    entry.

    The density sees the training split, clean and after each of ``degradations``; the threshold is
    the ``quantile`` of the validation split's scores, so about ``1 − quantile`` of images like the
    validation images are called unfamiliar by design. The presentation probe sees the same images at their
    four quarter turns (the model input turned, which is what the turned image's input is), each as it is and
    inverted, and is scored on the validation split, which it never saw.
    """
    from dataclasses import replace

    from classifier.artifact import read_metadata, sha256_file, staged, writable_folder, write_metadata
    from classifier.dataset import label_indices, load_collection, split_from_record
    from classifier.inference import Classifier
    from classifier.preprocess import gray_to_model_input

    if not 0.5 <= quantile < 1.0:
        raise ValueError("the quantile must be in [0.5, 1)")
    folder = Path(model)
    metadata = read_metadata(folder)
    writable_folder(folder)  # it writes there after the fit
    classifier = Classifier.load(folder, novelty=False)  # the check it replaces may be lost or damaged
    split = metadata.data.get("split", {})
    train, validation = split_from_record(load_collection(data), split, model=f"model {folder}")
    classes = metadata.classes
    spec, lungs = classifier.spec, classifier.lungs

    def embed_presentations(paths: Sequence[Path], degradation: str) -> npt.NDArray[np.float32]:
        """N × 8 × d: the features of each image in its :data:`PRESENTATIONS` (class ``k + 4·inverted``)."""
        rows, step = [], max(batch // PRESENTATIONS, 1)
        for start in range(0, len(paths), step):
            inputs = []
            for gray in _degraded_grays(paths[start : start + step], degradation, max(spec.input_size)):
                for shown in (gray, 1.0 - gray):
                    model_input = gray_to_model_input(shown, spec, lungs)
                    inputs += [np.ascontiguousarray(np.rot90(model_input, k)) for k in range(4)]
            rows.append(classifier.embed(inputs).reshape(len(inputs) // PRESENTATIONS, PRESENTATIONS, -1))
        return np.concatenate(rows)

    train_paths = [item.path for item in train]
    train_labels = np.array(label_indices(train, classes), dtype=np.int64)
    versions = ["none", *degradations]
    features = []
    for degradation in versions:
        LOGGER.info("novelty: features of %d training images, turned, inverted (%s)", len(train), degradation)
        features.append(embed_presentations(train_paths, degradation))
    every = np.concatenate(features)  # (versions · N) × 8 × d
    images, d = every.shape[0], every.shape[2]
    held_out = embed_presentations([item.path for item in validation], "none")
    if not (np.isfinite(every).all() and np.isfinite(held_out).all()):
        raise ModelArtifactError(  # else a NaN threshold in model.json: no image ever unfamiliar
            f"model {metadata.version} gives features that are not finite numbers (weights of a diverged "
            "training?): no novelty check can be fitted to it"
        )
    try:
        labels = np.tile(train_labels, len(versions))
        density = fit_density(every[:, 0], labels, rank=rank, shrinkage=shrinkage)
        LOGGER.info("novelty: presentation probe on %d images", images * PRESENTATIONS)
        probe = fit_probe(every.reshape(-1, d), np.tile(np.arange(PRESENTATIONS), images), PRESENTATIONS)
    except (ValueError, np.linalg.LinAlgError) as exc:  # features that do not vary: a dead network
        raise ModelArtifactError(
            f"no novelty check can be fitted to model {metadata.version}: {exc}"
        ) from exc
    validation_scores = density.score(held_out[:, 0])
    threshold = float(np.quantile(validation_scores, quantile))
    if not (math.isfinite(threshold) and threshold > 0):  # every validation image at a class mean
        raise ModelArtifactError(
            f"no novelty check can be fitted to model {metadata.version}: its validation images all score "
            f"{threshold}, and an image is unfamiliar only above a positive threshold"
        )
    named = np.array(probe.most_probable(held_out.reshape(-1, d))).reshape(-1, PRESENTATIONS)
    right = named == np.arange(PRESENTATIONS)  # N × 8: each presentation of each validation image
    path, probe_path = folder / NOVELTY_FILE, folder / PRESENTATION_PROBE_FILE
    density.save(staged(path))  # in place with the model.json that records them (write_metadata)
    probe.save(staged(probe_path))
    record: dict[str, Any] = {
        "method": "class-conditional Gaussian, shared shrunk covariance, of the softmax layer's input "
        "(Lee et al. 2018); novelty = min squared Mahalanobis distance / threshold",
        "file": NOVELTY_FILE,
        "sha256": sha256_file(staged(path)),
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
        "presentation_probe": {
            "method": "softmax regression of the presentation (quarter turns 0-3, + 4 if inverted) on the "
            "standardised features of the training images above, each at its four turns, as it is and "
            "inverted",
            "file": PRESENTATION_PROBE_FILE,
            "sha256": sha256_file(staged(probe_path)),
            "l2": PROBE_L2,
            "tolerance": PROBE_TOLERANCE,
            "validation": {
                "images": len(validation),
                "named_right": float(np.mean(right)),
                "named_right_by_presentation": [float(x) for x in np.mean(right, axis=0)],
                "as_trained_called_otherwise": int(np.sum(~right[:, 0])),
            },
        },
    }
    write_metadata(folder, replace(metadata, novelty=record), [path, probe_path])
    return record


def confirmed(
    presentation: Presentation, novelty: float, novelty_undone: float
) -> tuple[Presentation, float]:
    """The verdict on an image the probe named other than as trained, from its novelty as given and once
    undone: the presentation to report and the novelty to report.

    - Familiar undone (novelty within the limit): the presentation the probe named, and the novelty as
      given. A chest radiograph on its side is unfamiliar as given and familiar turned back: it is the wrong
      way up.
    - Unfamiliar undone: no presentation doubt, and the larger of the two novelties. The probe says the
      image is not presented as the training images were, and undoing what it names does not make it
      familiar either, so it is unlike them both ways. A photograph is so, and so is the lower-leg CR
      upside down, which scores just under the limit as given (0.985) and well above it undone. No
      validation chest radiograph, clean or degraded, was named other than as trained and then found
      unfamiliar undone (model card): on those, this refused nothing."""
    if novelty_undone <= NOVELTY_LIMIT:
        return presentation, novelty
    return Presentation(), max(novelty, novelty_undone)
