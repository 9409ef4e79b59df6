"""benchmarks/age_probe.py: how it balances the classes, where it puts the threshold, and its AUC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.age_probe import auc, balanced, threshold_refusing

pytestmark = pytest.mark.unit


def test_the_rare_class_is_repeated_in_whole_times() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    index = balanced(labels)
    assert np.bincount(labels[index]).tolist() == [8, 8]  # 2 children, 4 times; the 8 adults once
    assert sorted(set(index.tolist())) == list(range(10))  # every row is used
    assert balanced(1 - labels).size == 16  # whichever class is the rare one
    with pytest.raises(ValueError, match="both classes"):
        balanced(np.zeros(4, dtype=np.int64))


def test_the_threshold_refuses_the_given_fraction_of_adults() -> None:
    adults = np.linspace(0.0, 1.0, 101)
    threshold = threshold_refusing(adults, 0.05)
    assert threshold == pytest.approx(0.95)
    assert int((adults > threshold).sum()) == 5


def test_auc_counts_pairs_and_ties_half() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


def test_the_nih_ages_are_found_for_data_given_as_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest's paths are resolved, DATA as typed was not: ``relative_to`` raised ValueError."""
    from benchmarks import age_probe
    from classifier.dataset import load_collection

    for name in ("a.png", "b.png"):
        (tmp_path / "data" / "normal").mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(np.full((40, 40), 100 + len(name), np.uint8))
        picture.save(tmp_path / "data" / "normal" / name)
    (tmp_path / "data" / "manifest.csv").write_text("file,label\nnormal/a.png,normal\nnormal/b.png,normal\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(age_probe, "_embed_files", lambda _classifier, items: np.zeros((len(items), 2)))
    data = Path("data")
    ages_of = {"normal/a.png": ("M", 42)}
    _, ages = age_probe._nih(None, load_collection(data), data, ages_of)  # type: ignore[arg-type]
    assert ages.tolist() == [42]
