"""Chest radiograph classification: DICOM/PIL pixels → model input → class probabilities.

Never imports ``dicom_node``; the node passes values in and reads :class:`Prediction` back.
"""
