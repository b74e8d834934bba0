"""Data: dataset readers, the synthetic benchmark, WebDataset shards, label sets, collate. Report parsing,
image decoding and transforms live in :mod:`mlip_fast.preprocess` (data imports them, never models).

Submodules (import them directly; this package imports nothing heavy on its own):
- ``mlip_fast.data.labels``: the label sets (``CHEXPERT5``, ``CHEXPERT_LABELS``, ``SYNTHETIC_LABELS``, ...)
- ``mlip_fast.data.synth``: ``generate``, ``make_sample`` (and ``python -m mlip_fast.data.synth``)
- ``mlip_fast.data.readers``: the item contract, index-file reading, bad-item bookkeeping, the errors
- ``mlip_fast.data.pretrain``: ``PretrainDataset``, ``ManifestDataset``, ``OpenIDataset``
- ``mlip_fast.data.evaluation``: one module per evaluation dataset (``SyntheticBenchmark``, CheXpert 5x200
  and label tables, RSNA, SIIM, COVID, image folders)
- ``mlip_fast.data.rle``: the run-length mask codec (SIIM)
- ``mlip_fast.data.sources``: ``build_pretrain_dataset`` (what ``--data`` names)
- ``mlip_fast.data.shards``, ``shard_reader``, ``shard_order``: writing, reading and ordering shards
- ``mlip_fast.data.mimic_prepare``: ``prepare_mimic`` (and ``python -m mlip_fast.data.mimic_prepare``)
- ``mlip_fast.data.collate``: ``Collator``, ``make_loader``
"""

__all__: list[str] = []
