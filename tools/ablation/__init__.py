
"""Ablation of MLIP's parts on the built-in synthetic benchmark: does each part help, in this implementation?

Arms (same towers, data, steps, optimizer and schedule; only the loss terms and the masking differ):

========== ================================================================ ======================================
arm        what trains                                                      flags of ``train.py``
========== ================================================================ ======================================
clip       global image-report InfoNCE, whole image                         --mask-ratio 0 --lambda-local 0 --lambda-sie 0
flip       global InfoNCE on a uniformly random r-masked view               --mask-ratio r --lambda-local 0 --lambda-sie 0
flip+local flip + the patch-sentence loss                                   --mask-ratio r --lambda-local L --lambda-sie 0
mlip       flip+local + integrity estimator, integrity-scored masking and   --mask-ratio r --lambda-local L --lambda-sie 0.1
           integrity weights (the ``guided`` integrity mode, the method's)  --sie-mode guided
mlip-<m>   mlip with integrity mode m: discriminative, maco, predictor      ... --sie-mode m
           (docs/training.md, "Integrity modes")
flip+local flip+local with optimal-transport patch-sentence matching        ... --local-matching ot --ot-eps E
-ot                                                                         --ot-iters N
mlip-ot    mlip with optimal-transport patch-sentence matching              ... --local-matching ot --ot-eps E
                                                                            --ot-iters N
========== ================================================================ ======================================

An ``-ot`` arm trains, and is evaluated (local zero-shot scores, localisation maps), with the OT matching; its
record also holds the other reading (``*_max``: the same model scored with token-wise max; a max arm's record
holds ``*_ot``), which tells a difference the training makes from one the reading makes. ``--ot-eps`` and
``--ot-iters`` take several values: the OT arms then run on their grid (the sweep that chose the defaults, on the
validation split: ``benchmarks/results/ot_sweep_cpu.json``).

An arm with an integrity mode also runs once per ``--sie-warmup`` value (``--sie-warmup 0 100``: with and without
100 steps of uniform masking and unit weights first; the key and the record carry ``sie_mode`` and ``sie_warmup``).
``--lambda-local`` sets the patch-sentence weight of the arms with the local loss (default the method's 1).

With ``--lambda-sie 0`` the estimator gets no gradient and keeps its zero-initialised output layer, so every
patch has logit 0: Gumbel-top-k over equal logits keeps a uniformly random K-subset (FLIP's masking) and every
image has the same kept integrity mass, which the mean-1 normalisation turns into weight 1 (no weighting).
Each record shows it: no finding-patch AUC of the estimator (a constant score) and weight CV 0. Every masked arm
runs at r = 0.5 (the method's default) and at r = 0.25 (the synthetic preset's while the default run matched by max,
until 2026-12-06), with the method's patch-sentence weight 1; ``mlip`` also runs with the preset's weight 4 at r =
0.25, the max-matching default run of that time (``DEPARTURES``: the preset's departures from the method, measured
one at a time and together). Each configuration runs for every seed. ``--steps 1000 --arms mlip --ratios 0.5`` into
another ``--out`` compares the preset with the method at the default run's former length
(``ablation_preset_1000_cpu.json``).

Per run (records of ``benchmarks/results/ablation_cpu.json``, one per run), on the test split: zero-shot macro AUC
over the CheXpert-5 classes scored by global, local (patch-sentence) and combined similarity; localisation
pointing accuracy with its chance rate; linear-probe macro AUC with 1% and 10% of the training labels (the
probe's stopping step chosen on the validation split); training samples/s; how well the integrity estimator's
logits and its training target (each patch's best similarity to its own report's sentences) single out the
patches inside the findings: the integrity mode's diagnostics of ``mlip_fast.eval.integrity.integrity_diagnostics``
on every test image with findings, at the run's mask ratio (0.5 for CLIP): ``sie_mask_auc`` (its ``estimator_auc``,
the per-image AUC of the mode's per-patch score against the union of the finding masks, chance 0.5), ``target_mask_auc``
(the estimator's target), ``finding_kept_share`` against ``kept_share_uniform`` = K/P, ``weight_cv``,
``weight_finding_corr``. The same zero-shot and localisation numbers on the validation split (``valid_*``) are what
any choice is made on; the paired rows (mode - FLIP+local, ...) give both splits, and the command names the mode
whose paired difference on validation zero-shot AUC is largest.

One command, resumable: a finished run's record is kept and never redone; an interrupted run is started again.
The step-time ratio of MLIP at r = 0.5 against CLIP at r = 0 is measured in one process (interleaved rounds,
min and median) into ``ablation_step_time_cpu.json``. Then the PNG and the README tables are regenerated
(``tools/readme_table.py``; ``--readme`` does only that).

    python -m tools.ablation [--steps 300] [--seeds 0 1 2] [--work-dir .cache/ablation]

The integrity modes (issue 26), at the default run's mask ratio and patch-sentence weight: the screen (every mode
with and without a warm-up against FLIP+local, 400 steps, 3 seeds), then the best mode on validation (guided
``mlip`` without a warm-up, as measured) at the default run's former 1,000 steps with 5 seeds::

    python -m tools.ablation --arms flip+local mlip mlip-discriminative mlip-maco mlip-predictor \
        --sie-warmup 0 100 --ratios 0.25 --lambda-local 4 --steps 400 --seeds 0 1 2 --step-time-rounds 0 \
        --work-dir .cache/ablation_modes --out benchmarks/results/ablation_modes_cpu.json \
        --png benchmarks/results/ablation_modes_cpu.png
    python -m tools.ablation --arms flip+local mlip --sie-warmup 0 --ratios 0.25 --lambda-local 4 \
        --steps 1000 --seeds 0 1 2 3 4 --step-time-rounds 0 --work-dir .cache/ablation_modes_1000 \
        --out benchmarks/results/ablation_modes_1000_cpu.json --png benchmarks/results/ablation_modes_1000_cpu.png

The data-efficiency curve (:mod:`tools.ablation.efficiency`): the arms on 10%, 30% and 100% of the training pairs
(``--train-fraction`` of the training app: nested subsets drawn by the seed, validation and test whole), the same
400 steps, into ``data_efficiency_cpu.json`` (records with arm, train_fraction, num_train, seed and the metrics) and
``data_efficiency_cpu.png``; in the screen's work folder the runs on all the pairs are the screen's::

    python -m tools.ablation --data-efficiency --fractions 0.1 0.3 1.0 --arms clip flip+local mlip \
        --sie-warmup 0 --ratios 0.25 --lambda-local 4 --steps 400 --seeds 0 1 2 \
        --work-dir .cache/ablation_modes

Modules: ``plan`` (the arms, the run plan and the record files), ``evaluate`` (the metrics of one exported model),
``runs`` (training runs in worker processes, the step-time measurement, the masking diagnosis), ``tables`` (the
README tables and the PNG), ``efficiency`` (the data-efficiency curve's tables, sentences and PNG) and ``cli`` (the
command).
"""
