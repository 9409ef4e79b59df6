"""The CXR DICOM node: receive chest radiographs, classify them, return SR + PDF results."""

__version__ = "0.1.0"
