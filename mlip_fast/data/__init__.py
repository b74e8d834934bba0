"""Data: report parsing, image loading, transforms, the synthetic benchmark, dataset readers, collate.

Submodules (import them directly; this package imports nothing heavy on its own):
- ``mlip_fast.preprocess.reports``: ``extract_sections``, ``split_sentences``, ``report_text``
- ``mlip_fast.data.images``: ``load_image``, ``ImageLoadError``
- ``mlip_fast.data.transforms``: ``ImageTransform``
- ``mlip_fast.data.synth``: ``generate``, ``make_sample`` (and ``python -m mlip_fast.data.synth``)
- ``mlip_fast.data.datasets``: ``PretrainDataset``, ``ManifestDataset``, ``OpenIDataset``,
  ``CheXpert5x200Dataset``, ``RSNAPneumoniaDataset``, ``SIIMPneumothoraxDataset``, ``ImageFolderDataset``
- ``mlip_fast.data.mimic_prepare``: ``prepare_mimic`` (and ``python -m mlip_fast.data.mimic_prepare``)
- ``mlip_fast.data.collate``: ``Collator``, ``make_loader``
"""

__all__: list[str] = []
