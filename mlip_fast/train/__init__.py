"""The DeepSpeed training app behind ``train.py``.

- ``args``: command-line arguments; ``ds_config``: DeepSpeed config loading and validation;
- ``data``: synthetic benchmark cache, dataset readers, resumable data order, collate;
- ``loop``: the engine loop; ``signals``: stop requests and the launcher watch;
- ``checkpoint``: finding and proving a checkpoint, resume; ``checkpoint_save``: atomic saves, export;
  ``checkpoint_files``: weights-only loading and the SHA-256 manifest (the trust model of checkpoints);
- ``evaluation``: zero-shot and localisation during and after training; ``reporting``: run log,
  metrics.jsonl, progress bar, curves PNG, summary.json;
- ``setup``: checks before any slow work, run folder, seed; ``process``: process group, rank-0 decisions, exit;
- ``run``: the data and engine phases; ``fit``: the training phase (checkpoints, validation);
  ``finish``: export, final evaluation, summary.json;
- ``main``: ``train(argv) -> summary`` and ``main()`` (exit codes).
"""

__all__: list = []
