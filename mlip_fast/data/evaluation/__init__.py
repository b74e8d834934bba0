"""Readers of the evaluation datasets (what :mod:`mlip_fast.eval` scores), one module per source:

- ``synthetic``: ``SyntheticBenchmark`` (labels, per-finding sentences and masks, segmentation targets)
- ``chexpert``: ``CheXpert5x200Dataset``, ``CheXpertLabels``, and how CheXpert's label cells are read
  (``chexpert_value``, ``map_uncertain``)
- ``rsna``: ``RSNAPneumoniaDataset``; ``siim``: ``SIIMPneumothoraxDataset``
- ``covid``: ``CovidChestXray``
- ``folders``: ``ImageFolderDataset`` (class subfolders), ``inspect_image_folder`` (split or class folders, or
  a one-line refusal of an ambiguous layout), ``MaskedImageFolder`` (images with masks)

Import the submodules directly; this package imports nothing on its own.
"""

__all__: list[str] = []
