"""Result objects for the radiologist's viewer: DICOM SR (TID 1500), PDF summary, Encapsulated PDF.

No network, no database: built from source datasets and classifier predictions.
"""
