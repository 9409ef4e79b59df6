"""The node's classifier: load an artifact once, predict batches, explain with Grad-CAM.

Hold one :class:`Classifier` per process and share it: loading costs seconds, a prediction milliseconds.
Calls from several threads are serialised by a lock (the traced graphs are built on first use).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image

from classifier.artifact import MODEL_FILE, ArtifactMetadata, load_verified_keras, read_metadata
from classifier.errors import ModelArtifactError, UnsupportedImageError
from classifier.novelty import LinearProbe, NoveltyCheck, Presentation, confirmed, presentations
from classifier.preprocess import (
    Box,
    FloatImage,
    LungFinder,
    PreprocessSpec,
    dataset_to_gray,
    dataset_to_model_input,
    framed_model_input,
    image_to_model_input,
    orientation_turns,
    pil_to_gray,
    read_image_file,
    upright,
)
from classifier.types import ModelInfo, Prediction, decided_label

LOGGER = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The model shipped in classifier/models/default/."""
    return Path(str(resources.files("classifier") / "models" / "default"))


def load_input(path: Path, spec: PreprocessSpec, lungs: LungFinder | None = None) -> FloatImage:
    """A DICOM file (by suffix or the DICM preamble) or a PNG/JPEG file → model input."""
    source = read_image_file(path)
    if isinstance(source, pydicom.Dataset):
        return dataset_to_model_input(source, spec, lungs)
    return image_to_model_input(source, spec, lungs)


class Classifier:
    """A loaded model artifact. Build with :meth:`load`."""

    def __init__(
        self,
        model: Any,
        metadata: ArtifactMetadata,
        *,
        indeterminate_threshold: float = 0.5,
        lungs: LungFinder | None = None,
        novelty: NoveltyCheck | None = None,
    ) -> None:
        if not 0.0 <= indeterminate_threshold <= 1.0:
            raise ValueError("the indeterminate threshold is a probability in [0, 1]")
        self._model = model
        self._metadata = metadata
        self._threshold = indeterminate_threshold
        self._lungs = lungs
        self._novelty = novelty
        self._embedding_model: Any | None = None
        self._gradcam_model: Any | None = None
        self._forward: Any | None = None
        self._explain: Any | None = None
        self._cells: CellGrid | None = None  # where the Grad-CAM layer's cells lie (feature_cells)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, indeterminate_threshold: float = 0.5, novelty: bool = True) -> Classifier:
        """Load ``path/model.keras`` after checking it against ``path/model.json`` (sha256); without
        ``novelty``, the check model.json records is left unread (to fit it again: lost, damaged or fitted
        for another model, it was what stopped the command that mends it)."""
        folder = Path(path)
        metadata = read_metadata(folder, verify=False)
        model = load_verified_keras(folder / MODEL_FILE, metadata.sha256)  # the bytes hashed are those loaded
        expected = (None, *metadata.preprocess.input_size, 3)
        if tuple(model.input_shape) != expected or model.output_shape[-1] != len(metadata.classes):
            raise ModelArtifactError(
                f"model shapes {model.input_shape}→{model.output_shape} contradict model.json"
            )
        try:  # checked now, not at the first heat map
            layer = model.get_layer(metadata.gradcam_layer)
        except ValueError as exc:
            raise ModelArtifactError(
                f"model.json names Grad-CAM layer {metadata.gradcam_layer!r}, which the model does not have"
            ) from exc
        if len(layer.output.shape) != 4:  # a pooled or flat layer: TensorFlow's error at the first heat map
            raise ModelArtifactError(
                f"model.json names Grad-CAM layer {metadata.gradcam_layer!r}, whose output "
                f"{tuple(layer.output.shape)} is not a feature map (batch, rows, columns, channels)"
            )
        head = _dense_softmax(model)  # the probabilities, the heat map and the novelty check read it
        features = int(head.kernel.shape[0])
        from classifier.lungs import artifact_lungs

        lungs = artifact_lungs(folder, metadata)
        check = NoveltyCheck.load(folder, metadata.novelty) if metadata.novelty and novelty else None
        read = None if check is None else int(check.density.means.shape[1])
        if read is not None and read != features:
            raise ModelArtifactError(
                f"the novelty check reads {read} features, the model gives {features}: it was fitted for"
                " another model (run 'cxr-node novelty' again)"
            )
        LOGGER.info(
            "loaded model %s version %s (novelty check %s; turn and negative checks %s)",
            metadata.name,
            metadata.version,
            "on" if check else "absent" if novelty else "not read",
            "on" if check and check.probe else "off (run 'cxr-node novelty')",
        )
        return cls(
            model, metadata, indeterminate_threshold=indeterminate_threshold, lungs=lungs, novelty=check
        )

    @property
    def info(self) -> ModelInfo:
        return self._metadata.info

    @property
    def spec(self) -> PreprocessSpec:
        return self._metadata.preprocess

    @property
    def lungs(self) -> LungFinder | None:
        """The lung model the preprocessing crops with (``None`` when the spec does not crop to lungs)."""
        return self._lungs

    @property
    def metadata(self) -> ArtifactMetadata:
        return self._metadata

    @property
    def indeterminate_threshold(self) -> float:
        return self._threshold

    @property
    def novelty(self) -> NoveltyCheck | None:
        """The artifact's check of how unlike the training images an input is (``None``: not fitted)."""
        return self._novelty

    def predict(
        self, images: Sequence[FloatImage], *, heatmap: bool = True, frames: Sequence[Box] | None = None
    ) -> list[Prediction]:
        """Predictions for already-preprocessed inputs (H×W×3 float32 from classifier.preprocess).

        ``frames``: the part of each whole image the input shows (:func:`classifier.preprocess.frame_box`);
        heat maps are placed there, so they line up with the whole radiograph. Default: the whole image.
        """
        return self._predict(images, heatmap=heatmap, frames=frames)[0]

    def embed(self, images: Sequence[FloatImage]) -> npt.NDArray[np.float32]:
        """N×d features the softmax layer reads (what :mod:`classifier.novelty` models)."""
        if len(images) == 0:  # a list, or an N×H×W×3 array
            return np.zeros((0, int(self._softmax_head().kernel.shape[0])), dtype=np.float32)
        batch = self._batch(images)
        with self._lock:
            features, _ = self._forward_pass(batch)
        return features

    def predict_datasets(
        self, datasets: Sequence[pydicom.Dataset], *, heatmap: bool = True
    ) -> list[Prediction]:
        """Predictions for DICOM images, read head up (:func:`classifier.preprocess.upright_turns`); each heat
        map is turned back onto the stored pixels, where the radiologist's viewer shows it. Every image gets
        the turn check (:attr:`Prediction.better_turn`): one without a Patient Orientation that says which way
        is up may be stored turned, and one whose Patient Orientation is wrong is read turned."""
        outcomes = self._datasets(datasets, heatmap=heatmap, each=False)
        return [outcome for outcome in outcomes if isinstance(outcome, Prediction)]

    def predict_datasets_each(
        self, datasets: Sequence[pydicom.Dataset], *, heatmap: bool = True
    ) -> list[Prediction | UnsupportedImageError]:
        """:meth:`predict_datasets`, an image that cannot be read answered in its place by the reason: the
        others are predicted in one batch, each decoded once (the node used to decode a whole batch again,
        one by one, to find the image that stopped it)."""
        return self._datasets(datasets, heatmap=heatmap, each=True)

    def _datasets(
        self, datasets: Sequence[pydicom.Dataset], *, heatmap: bool, each: bool
    ) -> list[Prediction | UnsupportedImageError]:
        min_side = max(self.spec.input_size)
        known = [orientation_turns(ds) for ds in datasets]
        turns = [k or 0 for k in known]  # Patient Orientation read once: the same turn there and back
        outcomes = self._timed(
            lambda pair: upright(dataset_to_gray(pair[0], min_side), pair[1]),
            list(zip(datasets, turns, strict=True)),
            heatmap,
            each=each,
        )
        return [
            p if not isinstance(p, Prediction) or p.heatmap is None or not k
            else replace(p, heatmap=upright(p.heatmap, -k))
            for p, k in zip(outcomes, turns, strict=True)
        ]

    def predict_images(self, images: Sequence[Image.Image], *, heatmap: bool = True) -> list[Prediction]:
        """Predictions for pictures, which have no header to say which way is up (the turn check says whether
        they look head up)."""
        return [
            replace(p, picture=True)
            for p in self._timed(pil_to_gray, images, heatmap, each=False)
            if isinstance(p, Prediction)
        ]

    def predict_file(self, path: Path, *, heatmap: bool = False) -> Prediction:
        """One DICOM or PNG/JPEG file, the way the node and the console read it (orientation, turn check)."""
        source = read_image_file(path)
        if isinstance(source, pydicom.Dataset):
            return self.predict_datasets([source], heatmap=heatmap)[0]
        return self.predict_images([source], heatmap=heatmap)[0]

    # ------------------------------------------------------------------------------------ internals

    def _batch(self, images: Sequence[FloatImage]) -> npt.NDArray[np.float32]:
        """The inputs as one N×H×W×3 float32 batch; each must have the model's input shape."""
        return np.stack([self._checked_input(image) for image in images])

    def _checked_input(self, image: FloatImage) -> npt.NDArray[np.float32]:
        """One input as float32, refused unless it has the model's input shape and finite values."""
        expected = (*self.spec.input_size, 3)
        array = np.asarray(image, dtype=np.float32)
        if array.shape != expected:
            raise UnsupportedImageError(f"model input must be {expected}, got {array.shape}")
        if not np.isfinite(array).all():  # every probability would be NaN, and no check would doubt it
            raise UnsupportedImageError("model input holds values that are not finite numbers")
        return array

    def _predict(
        self, images: Sequence[FloatImage], *, heatmap: bool, frames: Sequence[Box] | None
    ) -> tuple[list[Prediction], npt.NDArray[np.float32]]:
        """:meth:`predict`, and the features the softmax layer read (N×d)."""
        if len(images) == 0:  # a list, or an N×H×W×3 array
            return [], np.zeros((0, 0), dtype=np.float32)
        batch = self._batch(images)
        start = time.perf_counter()
        with self._lock:
            if heatmap:
                features, probabilities, maps = self._gradcam(batch, frames or [Box()] * len(batch))
            else:
                features, probabilities = self._forward_pass(batch)
                maps = [None] * len(batch)
        if not np.isfinite(probabilities).all():  # the inputs are finite (_batch): the weights are not
            raise ModelArtifactError(
                f"model {self.info.name} {self.info.version} gives probabilities that are not finite numbers "
                "(weights of a diverged training?): no finding"
            )
        novelty: list[float | None] = [None] * len(batch)
        if self._novelty is not None:
            novelty = [float(ratio) for ratio in self._novelty.ratios(features)]
        elapsed_ms = (time.perf_counter() - start) * 1000.0 / len(batch)
        predictions = [
            self._prediction(row, heat, ratio, elapsed_ms)
            for row, heat, ratio in zip(probabilities, maps, novelty, strict=True)
        ]
        return predictions, features

    def _timed(
        self, to_gray: Any, sources: Sequence[Any], heatmap: bool, *, each: bool
    ) -> list[Prediction | UnsupportedImageError]:
        """Predictions for ``sources``; with ``each``, an image that cannot be read has its
        :class:`UnsupportedImageError` in its place, else the first such error is raised."""
        start = time.perf_counter()
        grays, inputs, frames = [], [], []
        refused: dict[int, UnsupportedImageError] = {}
        for index, source in enumerate(sources):
            try:
                gray = to_gray(source)
                _check_picture(gray)
                model_input, frame = framed_model_input(gray, self.spec, self._lungs)
                self._checked_input(model_input)
            except UnsupportedImageError as exc:
                if not each:
                    raise
                refused[index] = exc
                continue
            grays.append(gray)
            inputs.append(model_input)
            frames.append(frame)
        preprocess_ms = (time.perf_counter() - start) * 1000.0 / max(len(sources), 1)
        done = iter(self._timed_predictions(grays, inputs, frames, heatmap, preprocess_ms))
        return [refused[index] if index in refused else next(done) for index in range(len(sources))]

    def _timed_predictions(
        self,
        grays: Sequence[FloatImage],
        inputs: Sequence[FloatImage],
        frames: Sequence[Box],
        heatmap: bool,
        preprocess_ms: float,
    ) -> list[Prediction]:
        predictions, features = self._predict(inputs, heatmap=heatmap, frames=frames)
        predictions = [
            replace(p, timings_ms={"preprocess": preprocess_ms, **p.timings_ms}) for p in predictions
        ]
        check = self._novelty
        if check is not None and check.probe is not None and predictions:
            start = time.perf_counter()
            novelty = [p.novelty for p in predictions]
            found = self._presentations(check, check.probe, grays, features, novelty)
            checks_ms = (time.perf_counter() - start) * 1000.0 / len(predictions)
            predictions = [
                replace(
                    p,
                    novelty=ratio,
                    better_turn=f.turn_back,
                    negative=f.negative,
                    timings_ms={**p.timings_ms, "input_checks": checks_ms},
                )
                for p, (f, ratio) in zip(predictions, found, strict=True)
            ]
        return predictions

    def _presentations(
        self,
        check: NoveltyCheck,
        probe: LinearProbe,
        grays: Sequence[FloatImage],
        features: npt.ArrayLike,
        novelty: Sequence[float | None],
    ) -> list[tuple[Presentation, float | None]]:
        """How each grey image is presented (turned, inverted), by the check's probe on the features the
        prediction already computed, and the novelty to report. An image it calls other than as trained is
        scored once more, undone, and :func:`classifier.novelty.confirmed` gives the verdict."""
        named = presentations(probe, features)
        result = list(zip(named, novelty, strict=True))
        doubted = [j for j, presentation in enumerate(named) if not presentation.as_trained]
        if not doubted:
            return result
        spec, lungs = self.spec, self._lungs
        undone = [framed_model_input(named[j].undo(grays[j]), spec, lungs)[0] for j in doubted]
        for j, ratio in zip(doubted, check.ratios(self.embed(undone)), strict=True):
            given = novelty[j]
            if given is not None:
                result[j] = confirmed(named[j], given, float(ratio))
        return result

    def _forward_pass(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The softmax layer's input features and the probabilities."""
        if self._forward is None:
            import keras
            import tensorflow as tf

            self._embedding_model = keras.Model(
                self._model.inputs, [self._softmax_head().input, self._model.output]
            )
            height, width = self.spec.input_size
            signature = [tf.TensorSpec((None, height, width, 3), tf.float32)]
            # One traced graph for every batch size: eager Keras costs ~15 ms of Python per call.
            self._forward = tf.function(
                lambda x: self._embedding_model(x, training=False),
                input_signature=signature,
            )
        features, probabilities = self._forward(batch)
        return np.asarray(features, dtype=np.float32), np.asarray(probabilities, dtype=np.float32)

    def _gradcam(
        self, batch: npt.NDArray[np.float32], frames: Sequence[Box]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[FloatImage | None]]:
        """Grad-CAM (Selvaraju et al. 2017) of the predicted class on the recorded feature layer."""
        import keras
        import tensorflow as tf

        if self._explain is None:
            layer = self._model.get_layer(self._metadata.gradcam_layer)
            head = self._softmax_head()
            self._gradcam_model = keras.Model(self._model.inputs, [layer.output, head.input])
            height, width = self.spec.input_size
            signature = [tf.TensorSpec((None, height, width, 3), tf.float32)]
            self._explain = tf.function(self._class_activation, input_signature=signature)
            self._cells = feature_cells(self._model, self._metadata.gradcam_layer)
        features, probabilities, cams_tensor = self._explain(tf.convert_to_tensor(batch))
        cams = cams_tensor.numpy()
        height, width = self.spec.input_size
        maps: list[FloatImage | None] = []
        for cam, frame in zip(cams, frames, strict=True):
            peak = float(cam.max())
            scaled = (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)
            if self._cells is None:
                resized = Image.fromarray(scaled, mode="F").resize((width, height), Image.Resampling.BILINEAR)
                heat = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
            else:
                heat = cells_over_input(scaled, self._cells, (height, width))
            maps.append(heatmap_in_whole_frame(heat, frame))
        return np.asarray(features, dtype=np.float32), np.asarray(probabilities, dtype=np.float32), maps

    def _softmax_head(self) -> Any:
        return _dense_softmax(self._model)

    def _class_activation(self, inputs: Any) -> tuple[Any, Any, Any]:
        """The softmax layer's input, the probabilities, and the ReLU of the feature maps weighted by the
        gradient of the top class's score *before* the softmax, as Grad-CAM defines it: the gradient of a
        probability vanishes as it nears 1 and mixes in the other classes (the map becomes "this class
        against the others")."""
        import tensorflow as tf

        head = self._softmax_head()
        with tf.GradientTape() as tape:
            features, pooled = self._gradcam_model(inputs, training=False)  # type: ignore[misc]
            logits = tf.matmul(pooled, head.kernel) + head.bias
            top = tf.argmax(logits, axis=1)
            score = tf.gather(logits, top, axis=1, batch_dims=1)
        probabilities = tf.nn.softmax(logits, axis=1)
        gradients = tape.gradient(score, features)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        return pooled, probabilities, tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))

    def _prediction(
        self, row: npt.NDArray[np.float32], heat: FloatImage | None, novelty: float | None, elapsed_ms: float
    ) -> Prediction:
        classes = self._metadata.classes
        top_index = int(np.argmax(row))
        top_class = classes[top_index]
        return Prediction(
            label=decided_label(top_class, float(row[top_index]), self._threshold),
            top_class=top_class,
            probabilities={name: float(value) for name, value in zip(classes, row, strict=True)},
            model=self.info,
            heatmap=heat,
            timings_ms={"predict": elapsed_ms},
            novelty=novelty,
        )


MIN_SIDE = 32  # pixels; a radiograph has hundreds


def _check_picture(gray: FloatImage) -> None:
    """A blank or thumbnail-sized image has no lungs to read, yet the model gave it a class (COVID-19 at
    0.73 for a black square) that only the novelty check, when fitted, doubted: refused instead."""
    height, width = gray.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise UnsupportedImageError(f"the image is {width}×{height} pixels, too small to be a radiograph")
    if float(np.max(gray) - np.min(gray)) < 1e-3:
        raise UnsupportedImageError("the image is blank (one grey level throughout)")


def _dense_softmax(model: Any) -> Any:
    """The model's last layer, a dense softmax classifier (every architecture and merge here ends so):
    checked at load, since every prediction reads its input and weights."""
    head = model.layers[-1]
    if not hasattr(head, "kernel") or head.get_config().get("activation") != "softmax":
        raise ModelArtifactError(f"the last layer {head.name!r} is not a dense softmax")
    return head


class CellGrid(NamedTuple):
    """Where the cells of a feature map lie over the model input, per axis (rows, then columns): cell i
    is centred on input pixel ``offset + i * stride`` (pixel p's centre being p)."""

    offset: tuple[float, float]
    stride: tuple[float, float]


_SPATIAL_LAYERS = ("Conv2D", "MaxPooling2D", "AveragePooling2D", "DepthwiseConv2D")
_POINTWISE_LAYERS = ("InputLayer", "Activation", "BatchNormalization", "Dropout", "ReLU", "Rescaling")


def feature_cells(model: Any, layer_name: str) -> CellGrid | None:
    """Where the cells of ``layer_name``'s feature map lie, for a plain chain of "valid" convolutions and
    poolings from the input (the seed CNN of Sugandi et al.): its 34 cells span input pixels 8.5 to 140.5
    of 150, and a map stretched over all 150 drew evidence up to 7 px further out (review). None for any
    other network ("same" padding, branches), whose cells lie within a pixel or two of where an even
    stretch puts them (measured on the shipped networks)."""
    offset, stride = [0.0, 0.0], [1.0, 1.0]
    previous = None
    for layer in model.layers:
        kind = type(layer).__name__
        if previous is not None:
            try:
                chained = layer.input is previous.output
            except (AttributeError, ValueError):  # more than one input, or none
                return None
            if not chained:
                return None
        if kind in _SPATIAL_LAYERS:
            if getattr(layer, "padding", "") != "valid":
                return None
            kernel = getattr(layer, "kernel_size", None) or layer.pool_size
            for axis in (0, 1):
                offset[axis] += (kernel[axis] - 1) / 2 * stride[axis]
                stride[axis] *= layer.strides[axis]
        elif kind not in _POINTWISE_LAYERS:
            return None
        if layer.name == layer_name:
            return CellGrid((offset[0], offset[1]), (stride[0], stride[1]))
        previous = layer
    return None


def cells_over_input(cam: FloatImage, cells: CellGrid, size: tuple[int, int]) -> FloatImage:
    """A feature map of values in [0, 1] laid over an input of ``size`` (rows, columns): linear between the
    centres of its cells (:class:`CellGrid`), the edge cells' values out to the input's edges."""
    axes = []
    for axis, length in enumerate(size):
        cell = (np.arange(length) - cells.offset[axis]) / cells.stride[axis]
        position = np.clip(cell, 0, cam.shape[axis] - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, cam.shape[axis] - 1)
        axes.append((low, high, (position - low).astype(np.float32)))
    (r0, r1, fr), (c0, c1, fc) = axes
    top = cam[r0][:, c0] * (1 - fc) + cam[r0][:, c1] * fc
    bottom = cam[r1][:, c0] * (1 - fc) + cam[r1][:, c1] * fc
    placed: FloatImage = np.clip(top * (1 - fr)[:, None] + bottom * fr[:, None], 0.0, 1.0).astype(np.float32)
    return placed


def heatmap_in_whole_frame(heatmap: FloatImage, frame: Box) -> FloatImage:
    """A heat map over the model input, which shows ``frame`` of the whole image, placed back into the
    whole image (zero outside the frame) at the input's size, so overlays line up with the radiograph."""
    if frame == Box():
        return heatmap
    height, width = heatmap.shape
    top, bottom, left, right = frame.pixels(height, width)
    inner = Image.fromarray(heatmap, mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:bottom, left:right] = np.clip(np.asarray(inner, dtype=np.float32), 0.0, 1.0)
    return canvas
