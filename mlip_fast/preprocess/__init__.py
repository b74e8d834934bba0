"""Preprocessing shared by the models and the data readers (below both, as open_clip keeps ``tokenizer.py``
and ``transform.py`` beside its factory): report text and images in, model inputs out.

Submodules (import them directly; this package imports nothing on its own):
- ``mlip_fast.preprocess.reports``: ``extract_sections``, ``split_sentences``, ``report_text``
- ``mlip_fast.preprocess.tokenization``: ``tokenize_reports``, ``ReportTokenizer``, WordPiece training and
  the shipped radiology vocabulary (``vocab/``, rebuilt by ``python -m mlip_fast.preprocess.build_vocab``)
- ``mlip_fast.preprocess.images``: ``load_image`` (PNG, JPEG, ..., DICOM through pydicom), ``ImageLoadError``
- ``mlip_fast.preprocess.transforms``: ``ImageTransform``, ``PreprocessConfig`` (the preprocessing a
  checkpoint stores)
"""

__all__: list[str] = []
