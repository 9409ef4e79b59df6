"""What the console needs from the rest of the node, as one protocol.

The console's pages only talk to the classifier, the reporting package, the ingest path and the
DICOM SCU through :class:`ConsoleServices`. :class:`NodeConsoleServices` is the real implementation;
it loads the model on first use (TensorFlow is imported then, not when the console starts).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import PureWindowsPath
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from classifier.errors import ClassifierError
from classifier.preprocess import display_image, picture_display, read_dataset
from dicom_node.eligibility import (
    DEFAULT_AGE_POLICY,
    AgePolicy,
    Eligibility,
    assess_dataset,
    dataset_age,
    not_classified,
)
from dicom_node.errors import (
    ClassificationError,
    ConflictError,
    IneligibleImageError,
    NodeError,
    NotFoundError,
    ReportingError,
    UndecodableDatasetError,
)
from dicom_node.ingest import Ingestor
from dicom_node.pipeline import load_classifier, node_identity
from dicom_node.scu import echo
from dicom_node.settings import Settings
from dicom_node.store.files import FileStore
from dicom_node.store.models import RemoteAe
from dicom_node.tls import client_context
from reporting.errors import ReportingError as ReportBuildError
from reporting.pdf import build_pdf
from reporting.types import AnalysedImage

if TYPE_CHECKING:
    from classifier.types import Prediction
    from dicom_node.pipeline import ImageClassifier

LOGGER = logging.getLogger(__name__)

IMAGE_FILE_MISSING = (
    "the image file is missing on the node (the retention policy did not remove it): an administrator can "
    "restore it from the backup, or the PACS can send the image again; the findings are kept"
)


class FeatureUnavailableError(NodeError):
    """A console feature this node cannot offer now (no usable model)."""


_GREY_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}  # bytes a pixel of these modes takes


@dataclass(frozen=True)
class Upload:
    """An image a user uploaded: a DICOM dataset or a PNG/JPEG picture (exactly one is set).
    ``ages`` is the node's age policy: a DICOM upload is judged by the same header rules as a received
    instance."""

    filename: str
    data: bytes
    dataset: pydicom.Dataset | None = None
    image: Image.Image | None = None
    ages: AgePolicy = DEFAULT_AGE_POLICY

    @property
    def is_dicom(self) -> bool:
        return self.dataset is not None

    @property
    def held_bytes(self) -> int:
        """About what the upload holds in memory: its bytes, and its pixels as read (a deflated data set's
        inflated, a picture's decoded)."""
        size = len(self.data)
        if self.dataset is not None:
            pixels = self.dataset.get("PixelData")
            size += len(pixels) if isinstance(pixels, bytes | bytearray) else 0
        if self.image is not None:
            # bytes per pixel as Pillow holds them: four for any mode of more than one band (RGB and LA
            # too, which counted three and two), two or four for 16- and 32-bit grey (I;16, I, F), else one
            width = 4 if len(self.image.getbands()) > 1 else _GREY_BYTES.get(self.image.mode, 1)
            size += self.image.width * self.image.height * width
        return size

    @property
    def eligibility(self) -> Eligibility | None:
        """What the node would decide from the DICOM header; None for a picture, which has none."""
        if self.dataset is None:
            return None
        return assess_dataset(self.dataset, ages=self.ages)

    @property
    def age_unknown(self) -> bool:
        """A DICOM upload whose header gives no age, classified with the caution to confirm an adult (a
        picture has no header: its user confirms an adult before it is classified)."""
        return self.dataset is not None and self.ages.cautions(dataset_age(self.dataset))


@dataclass(frozen=True)
class IngestOutcome:
    """Where an uploaded DICOM file ended up in the node's database."""

    study_pk: int
    instance_pk: int
    duplicate: bool


class ConsoleServices(Protocol):
    """The node's capabilities the console calls; each method may raise a :class:`NodeError`."""

    def dicom_preview(self, dataset: pydicom.Dataset) -> npt.NDArray[np.uint8]:
        """The windowed display image (uint8 HxW, white bone) of a dataset."""

    def stored_preview(self, relative_path: str) -> npt.NDArray[np.uint8]:
        """The display image of an instance in the node's file store."""

    def classify(self, upload: Upload) -> Prediction:
        """Classify an uploaded image with the node's model (with heat map)."""

    def report_pdf(self, upload: Upload, prediction: Prediction, *, analysed_at: datetime) -> bytes:
        """The PDF summary of an upload's classification."""

    def ingest(self, upload: Upload, *, calling_ae: str) -> IngestOutcome:
        """Store an uploaded DICOM instance exactly as a C-STORE would (then the pipeline runs)."""

    def echo(self, ae: RemoteAe) -> int:
        """C-ECHO a remote AE; returns the DIMSE status (raises when there is no association)."""


class NodeConsoleServices:
    """The real services, wired from the node's settings."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        ingestor: Ingestor | None = None,
        classifier_loader: Callable[[], ImageClassifier] | None = None,
    ) -> None:
        """``ingestor`` and ``classifier_loader`` come from the running node (app.py): uploads then use
        its file store and arm the settle timer at once, and the console shares the pipeline's model.
        Without them (a console alone, its tests) the console builds its own on first use."""
        self._settings = settings
        self._session_factory = session_factory
        self._ingestor = ingestor
        self._classifier_loader = classifier_loader
        self._classifier: ImageClassifier | None = None
        self._lock = threading.Lock()
        # One console classification at a time: a Keras model is not meant for concurrent calls,
        # and on a small node the pipeline's inference must not be starved.
        self._predict_lock = threading.Lock()

    # -- images -----------------------------------------------------------------------------

    def dicom_preview(self, dataset: pydicom.Dataset) -> npt.NDArray[np.uint8]:
        try:
            return np.asarray(display_image(dataset), dtype=np.uint8)
        except ClassifierError as exc:
            raise UndecodableDatasetError(f"the image cannot be displayed: {exc}") from exc

    def stored_preview(self, relative_path: str) -> npt.NDArray[np.uint8]:
        root = self._settings.storage_dir
        path = (root / relative_path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFoundError(IMAGE_FILE_MISSING)
        return self.dicom_preview(read_dataset(path))

    # -- classification and report ----------------------------------------------------------

    def _model(self) -> ImageClassifier:
        with self._lock:
            if self._classifier is None:
                try:
                    if self._classifier_loader is not None:
                        self._classifier = self._classifier_loader()
                    else:
                        self._classifier = load_classifier(self._settings)
                except ClassifierError as exc:
                    raise FeatureUnavailableError(f"no usable model: {exc}") from exc
            return self._classifier

    def classify(self, upload: Upload) -> Prediction:
        model = self._model()
        heatmap = True  # the console always shows where the model looked (one image: cheap)
        predictions: list[Prediction]
        try:
            with self._predict_lock:
                if upload.dataset is not None:
                    predictions = model.predict_datasets([upload.dataset], heatmap=heatmap)
                elif upload.image is not None:
                    predictions = model.predict_images([upload.image], heatmap=heatmap)
                else:
                    raise ClassificationError("the upload holds no image")
        except ClassifierError as exc:
            raise ClassificationError(f"the image cannot be classified: {exc}") from exc
        prediction = predictions[0]
        refusal = prediction.doubt
        if refusal is not None and self._settings.pipeline.skip_unfamiliar:
            raise IneligibleImageError(not_classified(refusal))
        return prediction

    def report_pdf(self, upload: Upload, prediction: Prediction, *, analysed_at: datetime) -> bytes:
        if upload.dataset is not None:
            source = upload.dataset
            preview = self.dicom_preview(upload.dataset)
        else:
            source = picture_dataset(upload.filename, analysed_at)
            preview = picture_preview(upload)
        analysed = AnalysedImage(
            source=source, prediction=prediction, preview=preview, age_unknown=upload.age_unknown
        )
        try:
            return bytes(build_pdf(
                [analysed], node_identity(self._settings), analysed_at=analysed_at,
                threshold=self._settings.pipeline.indeterminate_threshold,
            ))
        except ReportBuildError as exc:
            raise ReportingError(f"the PDF report could not be built: {exc}") from exc

    # -- ingest and DICOM network -----------------------------------------------------------

    def ingest(self, upload: Upload, *, calling_ae: str) -> IngestOutcome:
        with self._lock:
            if self._ingestor is None:
                storage = self._settings.storage
                store = FileStore(
                    self._settings.storage_dir, fsync=storage.fsync, min_free_bytes=storage.min_free_bytes,
                    direct_io=storage.direct_io,
                )
                self._ingestor = Ingestor(self._session_factory, store,
                                          results_dir=self._settings.results_dir)
            ingestor = self._ingestor
        result = ingestor.ingest_bytes(upload.data, calling_ae=calling_ae, source="upload")
        if result.own_result is not None:  # no instance row holds it: the API answered instance_id 0
            raise ConflictError(
                f"this file is one of the node's own results (result object {result.own_result}); "
                "it is not stored again"
            )
        return IngestOutcome(
            study_pk=int(result.study_pk), instance_pk=int(result.instance_pk), duplicate=result.duplicate
        )

    def echo(self, ae: RemoteAe) -> int:
        if ae.host is None or ae.port is None:
            raise NodeError("this AE has no host and port to call")
        tls = None
        if ae.tls:
            tls = client_context(self._settings.dicom.tls)
        return int(
            echo(
                ae.host,
                ae.port,
                ae.ae_title,
                calling_aet=self._settings.dicom.ae_title,
                tls=tls,
                timeout=10.0,
            )
        )


def picture_dataset(filename: str, when: datetime) -> pydicom.Dataset:
    """A minimal dataset standing in for a PNG/JPEG upload, so the PDF says what it was.

    A picture has no patient: the identifiers are empty, the UIDs are new (a report covers one study).
    """
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    ds = pydicom.Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    # the name without any folder, Windows' too: a backslash is LO's value separator, which split the
    # description into a list the PDF printed as one (review)
    name = PureWindowsPath(filename).name
    ds.StudyDescription = f"Uploaded picture {name}"[:64]
    local = when.astimezone()
    ds.StudyDate = local.strftime("%Y%m%d")
    ds.StudyTime = local.strftime("%H%M%S")
    ds.Modality = "OT"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    return ds


def picture_preview(upload: Upload, max_size: int = 1024) -> npt.NDArray[np.uint8]:
    """A grayscale display image of a PNG/JPEG upload (pictures are already windowed): the grey picture
    the model reads (:func:`classifier.preprocess.picture_display`), so that the heat map lies where the model
    looked. Pillow's own grey conversion neither turns a photograph by its EXIF orientation, as the model
    does, nor scales a 16-bit picture (one holding a 12-bit radiograph came out white)."""
    if upload.image is None:
        raise NodeError("the upload holds no picture")
    try:
        return picture_display(upload.image, max_size)
    except ClassifierError as exc:
        raise UndecodableDatasetError(f"the image cannot be displayed: {exc}") from exc
