"""How honest are the model's probabilities, and would one temperature make them more so?

A probability is honest when, of the images called with p ≈ 0.7, about 70 % are right. The reliability
table says that bin by bin for the validation split (the group split of model.json). Temperature scaling
(Guo et al., ICML 2017) is the standard one-number repair: the logits are divided by T before the
softmax (T < 1 sharpens, T > 1 softens), which keeps every image's top class and the order of every
class's probability, so accuracy and AUC cannot change. The model's probabilities are a softmax, so
``softmax(log p / T)`` is the softmax of its logits over T.

T fitted and scored on the same images flatters it, so it is *cross-fitted*: the validation groups are
cut in two random halves, T is fitted on one half (least log loss) and scored on the other, both ways,
for ``--repeats`` cuts. With ``--wheels`` (the ``pneumonia_model_package`` wheels of ``other_sources.py``)
it also shows what T would do to images from other sources, where the model is wrong most often, and to
the real CR ``RG1_UNCI`` of pydicom-data.

    PYTHONPATH=. python benchmarks/calibration.py MODEL_DIR /work/shared/data/cxr3 [--wheels W ...]

Prints tables and, as the last line, a JSON object.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks import table
from benchmarks.posthoc import Probabilities, called, parser, score
from classifier.cli import at_least, random_seed, saying_errors
from classifier.metrics import brier_score, expected_calibration_error, log_loss, reliability_bins
from classifier.types import INDETERMINATE

#: The range a fitted temperature is searched in.
LOWEST, HIGHEST = 0.2, 5.0


def with_temperature(probabilities: Probabilities, temperature: float) -> Probabilities:
    """Each row's softmax logits divided by ``temperature``, as probabilities again."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return np.asarray(scaled / scaled.sum(axis=1, keepdims=True), dtype=np.float64)


def fit_temperature(probabilities: Probabilities, truth: npt.NDArray[np.int64]) -> float:
    """The temperature in [:data:`LOWEST`, :data:`HIGHEST`] with the least log loss on these images.

    The log loss is convex in 1/T (a log-sum-exp less a linear term), so a golden-section search over
    1/T finds its minimum; 60 steps narrow the interval below 10⁻⁹."""

    def loss(inverse: float) -> float:
        return log_loss(with_temperature(probabilities, 1.0 / inverse), truth)

    low, high = 1.0 / HIGHEST, 1.0 / LOWEST
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    left_loss, right_loss = loss(left), loss(right)
    for _ in range(60):
        if left_loss <= right_loss:
            high, right, right_loss = right, left, left_loss
            left = high - ratio * (high - low)
            left_loss = loss(left)
        else:
            low, left, left_loss = left, right, right_loss
            right = low + ratio * (high - low)
            right_loss = loss(right)
    return float(2.0 / (low + high))


def group_halves(groups: Sequence[str], rng: np.random.Generator) -> npt.NDArray[np.bool_]:
    """A random half of the groups, as a mask over the images: no group on both sides."""
    names = sorted(set(groups))
    chosen = set(rng.permutation(names)[: len(names) // 2].tolist())
    return np.array([group in chosen for group in groups], dtype=bool)


def _scores(probabilities: Probabilities, truth: npt.NDArray[np.int64]) -> dict[str, float]:
    return {
        "log_loss": log_loss(probabilities, truth),
        "brier": brier_score(probabilities, truth),
        "ece": expected_calibration_error(probabilities, truth),
    }


def cross_fit(
    probabilities: Probabilities, truth: npt.NDArray[np.int64], groups: Sequence[str], repeats: int, seed: int
) -> dict[str, Any]:
    """T fitted on one half of the groups, scored on the other, both ways, ``repeats`` times: the mean
    and spread of T, each score before and after, and how often the held-out log loss fell."""
    if len(set(groups)) < 2:  # one half is empty: its scores of no images (0.0) halved the averages
        raise ValueError(f"cross-fitting needs images of two groups at least, not {len(set(groups))}")
    rng = np.random.default_rng(seed)
    temperatures: list[float] = []
    before: list[dict[str, float]] = []
    after: list[dict[str, float]] = []
    for _ in range(repeats):
        half = group_halves(groups, rng)
        for fit, held_out in ((half, ~half), (~half, half)):
            temperature = fit_temperature(probabilities[fit], truth[fit])
            temperatures.append(temperature)
            before.append(_scores(probabilities[held_out], truth[held_out]))
            after.append(_scores(with_temperature(probabilities[held_out], temperature), truth[held_out]))
    result: dict[str, Any] = {
        "fits": len(temperatures),
        "temperature_mean": float(np.mean(temperatures)),
        "temperature_sd": float(np.std(temperatures)),
    }
    for name in before[0]:
        result[f"{name}_before"] = float(np.mean([row[name] for row in before]))
        result[f"{name}_after"] = float(np.mean([row[name] for row in after]))
        pairs = zip(after, before, strict=True)
        result[f"{name}_better"] = float(np.mean([fitted[name] < trained[name] for fitted, trained in pairs]))
    return result


def _reliability_table(probabilities: Probabilities, truth: npt.NDArray[np.int64]) -> str:
    rows = [
        [f"{row['low']:.1f}–{row['high']:.1f}", row["images"], row["confidence"], row["accuracy"]]
        for row in reliability_bins(probabilities, truth, bins=10)
    ]
    return table.render([("top probability", ""), ("images", "d"), ("mean", ".3f"), ("right", ".3f")], rows)


@saying_errors
def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__ or "")
    arguments.add_argument(
        "--repeats", type=at_least(1), default=200, help="random group halves (each fitted both ways)"
    )
    arguments.add_argument("--seed", type=random_seed, default=0)
    args = arguments.parse_args(argv)

    scored = score(args.model, args.data, args.wheels)
    classifier, classes, truth, clean = scored.classifier, scored.classes, scored.truth, scored.probabilities
    validation = scored.validation
    groups = [item.group for item in validation]

    fitted = fit_temperature(clean, truth)
    try:
        crossed = cross_fit(clean, truth, groups, args.repeats, args.seed)
    except ValueError as exc:
        sys.exit(f"calibration: {exc}")
    temperatures = {"as trained": 1.0, "cross-fitted mean": crossed["temperature_mean"]}
    shifted: list[dict[str, Any]] = []
    for name, temperature in temperatures.items():
        row: dict[str, Any] = {"temperature": name, "T": temperature}
        row["RG1 p(covid)"] = float(with_temperature(scored.rg1, temperature)[0, classes.index("covid")])
        for name_of_source, (_, probabilities, doubted) in scored.others.items():
            source = name_of_source.split(",")[0]  # "Kermany 2018", "adult web images"
            kept = with_temperature(probabilities, temperature)[~np.asarray(doubted, dtype=bool)]
            labels = called(kept, classes, classifier.indeterminate_threshold)
            row[f"{source}: covid"] = labels.count("covid")
            row[f"{source}: indeterminate"] = labels.count(INDETERMINATE)
            row[f"{source}: median p(covid)"] = float(np.median(kept[:, classes.index("covid")]))
        shifted.append(row)

    confidence = clean.max(axis=1)
    print(f"model {classifier.info.version}; validation split {len(validation)} images, {len(set(groups))}"
          f" groups; mean top probability {confidence.mean():.3f}, accuracy"
          f" {np.mean(clean.argmax(axis=1) == truth):.3f}")  # fmt: skip
    print(_reliability_table(clean, truth))
    print()
    print(f"T fitted on all {len(validation)} images: {fitted:.3f} (scored on the same images, flattering)")
    scores = ("log_loss", "brier", "ece")
    print(table.render(
        [("held-out half", ""), *[(name, ".4f") for name in scores]],
        [["as trained", *[crossed[f"{name}_before"] for name in scores]],
         [f"T fitted on the other half ({crossed['temperature_mean']:.3f} ± {crossed['temperature_sd']:.3f})",
          *[crossed[f"{name}_after"] for name in scores]],
         [f"halves better with T (of {crossed['fits']})", *[crossed[f"{name}_better"] for name in scores]]],
    ))  # fmt: skip
    print()
    keys = [key for key in shifted[0] if key != "temperature"]
    print(table.render(
        [("temperature", ""), *[(key, "d" if isinstance(shifted[0][key], int) else ".3f") for key in keys]],
        [[row["temperature"], *[row[key] for key in keys]] for row in shifted],
    ))  # fmt: skip
    print(table.json_line({
        "model": classifier.info.version,
        "images": len(validation),
        "reliability": reliability_bins(clean, truth, bins=10),
        "temperature_all": fitted,
        "cross_fit": crossed,
        "other_sources": shifted,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
