"""Evaluation: zero-shot and few-shot classification, few-shot segmentation, retrieval, localisation.

Import the submodules directly (nothing heavy happens at import time):
- ``mlip_fast.eval.metrics``: AUC / ROC, accuracy, F1, Dice, IoU, Recall@K, median rank, pointing.
- ``mlip_fast.eval.prompts``: ``load_prompts(name_or_path)`` for the shipped prompt files.
- ``mlip_fast.eval.zeroshot``: ``zero_shot_classify(model, data, class_prompts, mode=...)``.
- ``mlip_fast.eval.localisation``: ``evaluate_localisation(model, records, ...)``.
- ``mlip_fast.eval.retrieval``: ``evaluate_retrieval(model, data, ...)``.
- ``mlip_fast.eval.fewshot``: ``few_shot_classify(model, train_data, test_data, ...)``.
- ``mlip_fast.eval.segmentation``: ``few_shot_segment(model, train_data, test_data, ...)``.
- ``mlip_fast.eval.common``: ``load_checkpoint``, ``eval_transform``, batching, ``write_summary``.
- ``mlip_fast.eval.protocols``: the field's protocols (CheXpert 5x200 selection, splits, balanced negatives)
  and the split definitions shipped in ``splits/``. The datasets' readers are in ``mlip_fast.data.evaluation``.
- ``mlip_fast.eval.benchmarks``: ``build_eval_sets(kind, data, task, ...)``: train / valid / test views.
- ``mlip_fast.eval.plots``: ROC curves, retrieval, few-shot curves, heat-map and segmentation overlays.
- ``python -m mlip_fast.eval <task> --checkpoint DIR --data ... --out DIR``: the command line
  (docs/evaluation.md).
"""

__all__: list[str] = []
