"""Label sets, one home each: the class names (CheXpert's spelling) shared by the dataset readers, the
synthetic benchmark, the prompt files, the evaluation protocols and the training app's validation.

- ``CHEXPERT_LABELS``: CheXpert's 14 observations, in its label files' column order (MIMIC-CXR's
  ``chexpert.csv`` uses the same names).
- ``CHEXPERT5``: the five competition observations of CheXpert 5x200 and the zero-shot benchmarks.
- ``GLORIA_5X200_OBSERVATIONS``: the observations GLoRIA's 5x200 selection requires to be negative (or
  blank) for every class other than the image's own: ``CHEXPERT5`` and eight more.
- ``SYNTHETIC_LABELS``: the label columns of the synthetic benchmark (``CHEXPERT5`` + pneumothorax and
  pneumonia).
- ``RSNA_LABELS``, ``SIIM_LABELS``, ``COVID_LABELS``: the labels of the RSNA Pneumonia, SIIM-ACR
  Pneumothorax and COVID chest X-ray readers.
"""
from __future__ import annotations

__all__ = ["CHEXPERT_LABELS", "CHEXPERT5", "GLORIA_5X200_OBSERVATIONS", "SYNTHETIC_LABELS", "RSNA_LABELS",
           "SIIM_LABELS", "COVID_LABELS"]

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# GLoRIA's constants.py (and MGCA's)
GLORIA_5X200_OBSERVATIONS = CHEXPERT5 + (
    "Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax", "Pleural Other",
    "Fracture", "Support Devices",
)
SYNTHETIC_LABELS = CHEXPERT5 + ("Pneumothorax", "Pneumonia")
RSNA_LABELS = ("Pneumonia",)
SIIM_LABELS = ("Pneumothorax",)
COVID_LABELS = ("Pneumonia", "COVID-19")
