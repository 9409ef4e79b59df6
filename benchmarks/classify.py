"""Classifier latency on the real CR images and training speed.

Median milliseconds per image for reading, pixel decoding, the whole preprocessing (decode included),
prediction at batch 1 and 16 (without and with Grad-CAM), end to end (file → Prediction, batch 1), and
the report's 1024-px preview (the PDF's image and the heat-map Secondary Capture, made once per report);
the peer, measured in the same run, is pydicom's own full-resolution decode (``Dataset.pixel_array``),
which the node's decode is quoted against as a ratio;
seconds per training epoch of the seed CNN and of the model's architecture(s) on 696 synthetic images (the
size of the cxr3 training split). Prints a table and, as the last line, a JSON object.

    PYTHONPATH=. python benchmarks/classify.py [--model classifier/models/default] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import table
from benchmarks.testdata import pydicom_data_file
from classifier.cli import at_least, saying_errors
from classifier.inference import Classifier, default_model_path
from classifier.preprocess import dataset_to_model_input, display_image, frame_pixels, read_dataset


def _median_ms(function: Callable[[], Any], repeats: int, per: int = 1) -> float:
    """Median ms of ``repeats`` calls (each divided by ``per`` images), after one warm-up call."""
    return _median_ms_after(lambda: None, lambda _: function(), repeats, per)


def _median_ms_after(
    setup: Callable[[], Any], function: Callable[[Any], Any], repeats: int, per: int = 1
) -> float:
    """:func:`_median_ms` of ``function(setup())`` with ``setup`` left out of the time: the decode of a
    dataset already read (a fresh one each time: pydicom keeps the array it decoded)."""
    function(setup())  # warm-up (graph tracing, caches)
    samples = []
    for _ in range(repeats):
        given = setup()
        start = time.perf_counter()
        function(given)
        samples.append((time.perf_counter() - start) * 1000.0 / per)
    return statistics.median(samples)


def _image_row(classifier: Classifier, name: str, repeats: int) -> dict[str, Any]:
    """Median times of each stage for one real CR file (functions close over this call's locals)."""
    spec = classifier.spec
    path = pydicom_data_file(name)
    image = dataset_to_model_input(read_dataset(path), spec, classifier.lungs)
    batch16 = [image] * 16
    return {
        "image": name,
        "read_ms": _median_ms(lambda: read_dataset(path), repeats),
        # The resolution the model path decodes (dataset_to_gray: JPEG 2000 level ≥ 2 × the input size),
        # of a dataset already read: the read is its own column (it was half of this one for RG1_UNCI).
        "decode_ms": _median_ms_after(
            lambda: read_dataset(path), lambda ds: frame_pixels(ds, 2 * max(spec.input_size)), repeats
        ),
        # The peer, timed alike: pydicom decoding the whole frame (about half a second for JPEG 2000, so
        # fewer repeats).
        "pydicom_decode_ms": _median_ms_after(
            lambda: read_dataset(path), lambda ds: ds.pixel_array, max(3, repeats // 3)
        ),
        "preprocess_ms": _median_ms(
            lambda: dataset_to_model_input(read_dataset(path), spec, classifier.lungs), repeats
        ),
        "predict_b1_ms": _median_ms(lambda: classifier.predict([image], heatmap=False), repeats),
        "predict_b16_ms": _median_ms(lambda: classifier.predict(batch16, heatmap=False), repeats, per=16),
        "gradcam_b1_ms": _median_ms(lambda: classifier.predict([image], heatmap=True), repeats),
        "end_to_end_ms": _median_ms(
            lambda: classifier.predict_datasets([read_dataset(path)], heatmap=False), repeats
        ),
        "end_to_end_gradcam_ms": _median_ms(
            lambda: classifier.predict_datasets([read_dataset(path)], heatmap=True), repeats
        ),
        # JPEG 2000 at the level whose longer side reaches 1024 px: RG1's full resolution.
        "preview_ms": _median_ms(lambda: display_image(read_dataset(path)), max(3, repeats // 3)),
    }


def _image_rows(classifier: Classifier, repeats: int) -> list[dict[str, Any]]:
    rows = [_image_row(classifier, name, repeats) for name in ("RG1_UNCI.dcm", "RG1_J2KR.dcm")]
    for row in rows:
        row["pydicom_over_decode"] = row["pydicom_decode_ms"] / row["decode_ms"]
    return rows


def _epoch_seconds(architecture: str, images: int) -> float:
    """One epoch of the architecture's own recipe on synthetic noise images (data does not change speed)."""
    from PIL import Image

    from classifier.training import TrainingConfig, train

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        per_class = images // 3
        for label in ("a", "b", "c"):
            (root / "data" / label).mkdir(parents=True)
            for index in range(per_class):
                pixels = (rng.random((320, 320)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "data" / label / f"{index}.png")
        config = TrainingConfig(
            architecture=architecture,
            data=root / "data",
            output=root / "model",
            epochs=3,  # the median epoch: not the first, which also builds the graphs
            progress=False,
            validation_fraction=0.2,
        )
        return train(config).seconds_per_epoch


@saying_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--repeats", type=at_least(1), default=15, help="timed calls per figure (≥ 1)")
    parser.add_argument("--no-training", action="store_true", help="skip the training-epoch measurement")
    args = parser.parse_args(argv)

    classifier = Classifier.load(args.model)
    rows = _image_rows(classifier, args.repeats)
    columns = list(rows[0])[1:]
    print(f"model {classifier.info.name} {classifier.info.version}, input {classifier.spec.input_size}")
    print(table.render(
        [("image", ""), *((c, ".1f") for c in columns)],
        [[row["image"], *(row[c] for c in columns)] for row in rows],
    ))
    epochs: dict[str, float] = {}
    if not args.no_training:
        # an ensemble's name joins its members' architectures with "+"
        for architecture in ("sugandi-cnn", *classifier.info.name.split("+")):
            epochs[architecture] = _epoch_seconds(architecture, 870)
            print(f"training epoch {architecture:<20} {epochs[architecture]:8.1f} s (696 images)")
    print(table.json_line({"model": classifier.info.version, "images": rows, "seconds_per_epoch": epochs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
