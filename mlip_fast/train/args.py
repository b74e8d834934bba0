"""Command-line arguments of the training app (``mlip-train``, ``deepspeed --module mlip_fast.train``, or
``train.py`` in a source checkout).

``--deepspeed_config`` takes a JSON file or the name of a config shipped in the package (``zero2``, ...;
see :func:`mlip_fast.train.ds_config.shipped_ds_configs`); the launcher adds ``--local_rank``. The
open_clip-style flags ``--batch-size``, ``--precision``, ``--wd``, ``--warmup`` (and ``--lr``) override the
matching ds config keys (:func:`mlip_fast.train.ds_config.apply_flag_overrides`); ``--help`` shows what each
shipped config sets for them (:func:`ds_config_table`), and the values of the config named before ``--help``.
With ``--data synthetic`` (the default) the flags left unset take the values of ``SYNTHETIC_PRESET``: the default
run (``deepspeed train.py --deepspeed_config ds.json``). A usage error is one line on stderr and exit 2; the model
(``--model``) is checked before the DeepSpeed config is asked for.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

from mlip_fast._cli import HelpFormatter, Parser, add_version
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS, DEFAULT_SIE_TEMPERATURE, LOCAL_MATCHINGS, SIE_MODES
from mlip_fast.data.shard_order import DEFAULT_SHUFFLE_BUFFER
from mlip_fast.functional.integrity import SIE_TARGETS
from mlip_fast.models.config import ConfigError
from mlip_fast.models.registry import get_model_config
from mlip_fast.train.compile import COMPILE_BACKENDS, DEFAULT_BACKEND
from mlip_fast.train.ds_checks import MAX_LR
from mlip_fast.train.ds_config import (WARMUP_FRACTION, DSConfigError, load_ds_config, precision_dtype,
                                       resolve_ds_config, shipped_ds_configs)
from mlip_fast.train.reporting import REPORT_TO

__all__ = ["build_parser", "parse_args", "ds_config_table", "SYNTHETIC_PRESET", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16")

# The default run: what --data synthetic (the default) uses for every one of these flags left unset.
# Sized to finish within 7 minutes on a 2-core CPU (measured in docs/training.md; tune_default_run_cpu.json has the
# tuning runs). lambda_local 4 departs from the method's 1 on the strength of the ablation at 1,000 steps
# (ablation_preset_1000_cpu.json, 3 seeds, with max matching at mask ratio 0.25: with the method's weight the run
# localised below chance). Optimal-transport matching (eps 0.05, 50 iterations) since 2026-12-06: on one Intel Xeon
# machine (one thread per run) the max matching's pointing fell from 3.1-3.4x chance at steps 250-500 to 1.25x at
# 1,000 (registers0_1200, seed 0), while OT's held (ot_1000, seeds 0-2: validation AUC 0.887 / 0.871 / 0.880,
# pointing 2.34x / 3.13x / 2.62x). The method's mask ratio 0.5 with OT (ot_mask0.5_1200, 1,200 steps, seeds 0-2):
# AUC 0.899 / 0.898 / 0.893, pointing 3.33x / 2.93x / 3.63x, with a step 1.17x faster on 2 cores (32 patches kept
# instead of 48), so 1,200 steps take about what 1,000 at 0.25 did. No ViT register tokens (registers4_1200 vs
# registers0_1200: no gain, 12% more ViT time). Since 2026-12-06 evening (a 1.4x faster step) 1,400 steps at eps
# 0.04 (ot_eps0.04_mask0.5_1400, seeds 0-1: AUC 0.912 / 0.923, pointing 3.67x / 3.07x), between 1,200 (0.895 / 0.888,
# 3.74x / 3.02x) and 1,600 (0.933 / 0.937, 3.00x / 2.65x: pointing falls after ~800 steps). Eval every 350 steps.
SYNTHETIC_PRESET = dict(
    synthetic_n=6000,
    steps=1400,
    mask_ratio=0.5,
    eval_every=350,
    save_every=350,
    lambda_local=4.0,
    in_memory=True,
    local_matching="ot",
    ot_eps=0.04,
)
SPEC_LAMBDA_LOCAL = 1.0
# The preset's mask ratio while the default run matched by max (until 2026-12-06): what the tools' records of that
# time (ablation, tuning candidates, train_changes) ran at, pinned there so they keep measuring the same runs.
MAX_PRESET_MASK_RATIO = 0.25
# Real data: one pass over the training split unless --steps / --epochs say otherwise.
REAL_DATA_EPOCHS = 1.0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _learning_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= MAX_LR):
        raise argparse.ArgumentTypeError(f"must be a learning rate in (0, {MAX_LR:g}], got {value}")
    return value


def _fraction_below_one(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (1 would accept a dataset with no readable item), got {value}")
    return value


def _share_of_data(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a share of the training pairs in (0, 1], got {value}")
    return value


def _dropout(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a dropout probability in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _ds_values(config: dict) -> dict:
    """What a DeepSpeed config sets for the flags that override it (as the run would resolve them)."""
    params = config.get("optimizer", {}).get("params", {})
    micro, total = config.get("train_micro_batch_size_per_gpu"), config.get("train_batch_size")
    batch = f"{micro} per process" if micro is not None else f"{total} global" if total is not None else "unset"
    warmup = config.get("scheduler", {}).get("params", {}).get("warmup_num_steps", "none")
    if warmup == "auto":
        warmup = f"auto ({WARMUP_FRACTION:.0%} of the run)"
    return {"batch": batch, "lr": params.get("lr", "unset"), "wd": params.get("weight_decay", 0.0), "warmup": warmup,
            "precision": {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(precision_dtype(config)), "fp32"),
            "zero": config.get("zero_optimization", {}).get("stage", 0)}


def ds_config_table(chosen: Optional[str] = None) -> str:
    """The epilog of ``--help``: what each shipped DeepSpeed config (and ``chosen``, a config named on the
    command line) sets for --batch-size, --lr, --wd, --warmup and --precision."""
    names = list(shipped_ds_configs())
    rows = []
    for name in ([chosen] if chosen else []) + names:
        try:
            values = _ds_values(load_ds_config(name))
        except (DSConfigError, OSError):
            continue
        rows.append((f"{name} (--deepspeed_config)" if name == chosen else name, values))
    header = ("config", "batch", "lr", "wd", "warmup", "precision", "ZeRO")
    table = [header] + [(n, v["batch"], str(v["lr"]), str(v["wd"]), str(v["warmup"]), v["precision"], str(v["zero"]))
                        for n, v in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return ("values of --batch-size, --lr, --wd, --warmup and --precision when the flag is not given: the "
            "DeepSpeed config's\n(shipped configs below; ds.json of a source checkout is zero2_fp32; a batch "
            "given as global is split\nover the processes and accumulation steps):\n" + "\n".join(lines))


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mlip-train"
    return "python -m mlip_fast.train" if name == "__main__.py" else name


def _named_ds_config(argv: Sequence[str]) -> Optional[str]:
    """The --deepspeed_config of a command line when it names an existing config (for --help's values)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--deepspeed_config", "--deepspeed-config", default=None)
    name = probe.parse_known_args(list(argv))[0].deepspeed_config
    try:
        return name if name and resolve_ds_config(name) else None
    except DSConfigError:
        return None


def build_parser(prog: Optional[str] = None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` only tells ``--help`` which DeepSpeed config's values to show first."""
    p = Parser(
        prog=prog or _prog(),
        description="MLIP pre-training with DeepSpeed. With no argument but --deepspeed_config it trains on the "
                    "built-in synthetic chest X-ray benchmark and evaluates zero-shot classification and "
                    "localisation at the end.",
        epilog=ds_config_table(_named_ds_config(argv)),
        formatter_class=HelpFormatter,
    )
    add_version(p)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="synthetic",
                      help="'synthetic' (built-in benchmark, generated into --cache-dir on first use), a shard folder "
                           "(python -m mlip_fast.data.shards), a prepared MIMIC-CXR master.csv, an Open-I directory (XML reports "
                           "+ PNG images), or a CSV/JSONL manifest")
    data.add_argument("--image-root", default=None,
                      help="folder that relative image paths in a master.csv / manifest start from "
                           "(default: the file's folder)")
    data.add_argument("--cache-dir", default=".cache", help="where the synthetic benchmark is generated")
    data.add_argument("--synthetic-n", type=_positive_int, default=None,
                      help=f"number of synthetic image-report pairs, all splits (default {SYNTHETIC_PRESET['synthetic_n']})")
    data.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic benchmark's generator")
    data.add_argument("--image-size", type=_positive_int, default=None,
                      help="input side in pixels (default: the model config's vision.image_size; must be a "
                           "multiple of the patch size)")
    data.add_argument("--num-workers", type=_non_negative_int, default=2,
                      help="DataLoader workers per process (with a shard folder also the number of read lanes, which "
                           "the data order depends on)")
    data.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=None,
                      help="hold the training split in memory (images decoded and reports tokenized once) and build "
                           "each batch in the training process, without DataLoader workers (default: on with --data "
                           "synthetic, off otherwise; not for shard folders)")
    data.add_argument("--shuffle-buffer", type=_positive_int, default=DEFAULT_SHUFFLE_BUFFER,
                      help="shard folders: samples in each lane's shuffle buffer")
    data.add_argument("--train-fraction", type=_share_of_data, default=1.0,
                      help="train on this share of the training pairs: a subset drawn by --seed (nested: a smaller "
                           "share's pairs are among a larger one's), the validation and test splits untouched; "
                           "not for shard folders")
    data.add_argument("--max-bad-fraction", type=_fraction_below_one, default=0.01,
                      help="fail when more than this share of the samples cannot be read")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="mlip-tiny", help="shipped model config name or a config JSON path")
    model.add_argument("--pretrained", default=None,
                       help="ImageNet ViT weights for the image tower: a local transformers / timm checkpoint file or "
                            "folder, or hf-hub:<repo id>")
    model.add_argument("--lock-image", action="store_true",
                       help="freeze the image tower (ViT; the integrity estimator and the projections still train)")
    model.add_argument("--lock-text", action="store_true",
                       help="freeze the report encoder (the projections still train)")
    model.add_argument("--model-overrides", type=_json_object, default=None,
                       help='JSON merged into the model config, e.g. \'{"text": {"dropout": 0.0}}\'')
    model.add_argument("--mask-ratio", type=float, default=None,
                       help="share of patches dropped before the ViT, in [0, 1); sets the model config's mask_ratio "
                            "(default: the synthetic preset's with --data synthetic, else the model config's)")
    model.add_argument("--vit-registers", type=_non_negative_int, default=None,
                       help="register tokens of the ViT (vision.registers: learned tokens beside CLS in every block, "
                            "left out of the outputs; default: the model config's, 0); --model-overrides "
                            "vision.registers wins")
    model.add_argument("--text-dropout", type=_dropout, default=None,
                       help="dropout of the report encoder (hidden states and attention probabilities; default: the "
                            "model config's, 0.1 for the shipped configs, on the synthetic benchmark too); "
                            "--model-overrides text.dropout wins")
    model.add_argument("--text-attention-dropout", type=_dropout, default=None,
                       help="dropout of the report encoder's attention probabilities alone (default: the same as "
                            "the hidden states'); 0 keeps scaled_dot_product_attention on its fused kernels, "
                            "which a dropout on the probabilities moves to the slower math path on CPU; "
                            "--model-overrides text.attention_dropout wins")
    model.add_argument("--attn", default="auto", choices=("auto", "flash", "xformers", "sdpa", "math"),
                       help="ViT attention backend")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    model.add_argument("--torchcompile", action="store_true",
                       help="torch.compile the image tower (around its masking), the report encoder where it is not "
                            "padding-free, and the loss for training; checkpoints and the export are unchanged "
                            "(docs/training.md: measured step and compile times)")
    model.add_argument("--torchcompile-backend", choices=COMPILE_BACKENDS, default=DEFAULT_BACKEND,
                       help="torch.compile backend of --torchcompile: inductor (generated kernels), aot_eager (traced "
                            "forward and backward without generated code: seconds to compile, no speed-up)")

    loss = p.add_argument_group("loss")
    loss.add_argument("--lambda-local", type=_non_negative, default=None,
                      help=f"weight of the patch-sentence loss (default {SPEC_LAMBDA_LOCAL}, the method's; "
                           f"{SYNTHETIC_PRESET['lambda_local']} on the synthetic benchmark)")
    loss.add_argument("--lambda-sie", type=_non_negative, default=0.1,
                      help="weight of the integrity mode's own term (the estimator's loss; the layout weight's or the "
                           "predictor's with --sie-mode maco / predictor)")
    loss.add_argument("--lambda-within", type=_non_negative, default=0.0,
                      help="weight of the within-report sentence term, an addition to the method (default 0, off): "
                           "the patch each sentence's max matching picks must be nearer to that sentence than to the "
                           "report's others (docs/training.md)")
    loss.add_argument("--sie-temperature", type=_positive, default=DEFAULT_SIE_TEMPERATURE,
                      help="temperature of the estimator's target: softmax over the kept patches of each patch's best "
                           "similarity to its own report's sentences / T")
    loss.add_argument("--sie-mode", choices=SIE_MODES, default=None,
                      help="the reading of semantic integrity (docs/training.md): 'guided' (the method's: masking by the "
                           "estimator, trained toward each patch's best similarity to its own report), 'discriminative' "
                           "(that similarity minus a soft maximum over the other reports of the batch), 'maco' (uniform "
                           "masking, views weighted by a learned mask-layout weight) or 'predictor' (uniform masking, "
                           "views weighted by a head's predicted integrity); sets the model config's sie_mode (default: "
                           "the model config's, guided)")
    loss.add_argument("--sie-warmup", type=_non_negative_int, default=None,
                      help="optimizer steps of uniform masking and unweighted rows before the integrity mode acts (its "
                           "heads train meanwhile); sets the model config's sie_warmup (default: the model config's, 0)")
    loss.add_argument("--sie-target", choices=SIE_TARGETS, default=None,
                      help="older spelling of --sie-mode for its first two values (guided, discriminative)")
    loss.add_argument("--impl", default="auto", choices=("auto", "reference", "chunked", "triton"),
                      help="patch-sentence scores implementation")
    loss.add_argument("--local-matching", choices=LOCAL_MATCHINGS, default=None,
                      help="patch-sentence matching of the local loss and of evaluation's local scores and maps: max "
                           "(token-wise, the method's) or ot (entropic optimal transport); sets the model config's "
                           "local_matching (default: ot on the synthetic benchmark, else the model config's, max)")
    loss.add_argument("--ot-eps", type=_positive, default=None,
                      help=f"regularisation of the OT matching (default: {SYNTHETIC_PRESET['ot_eps']} on the synthetic "
                           f"benchmark, else the model config's, {DEFAULT_OT_EPS}); needs --local-matching ot")
    loss.add_argument("--ot-iters", type=_positive_int, default=None,
                      help=f"Sinkhorn iterations of the OT matching (default: the model config's, {DEFAULT_OT_ITERS}); "
                           "needs --local-matching ot")

    run = p.add_argument_group("optimisation (each flag overrides the matching key of the ds config; the table at "
                               "the end shows the configs' values)")
    run.add_argument("--batch-size", type=_positive_int, default=None,
                     help="images per process per micro-batch (default: the ds config's train_micro_batch_size_per_gpu, "
                          "or its train_batch_size split over processes; the global batch becomes batch size x "
                          "accumulation x processes)")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="training precision (default: the ds config's bf16 / fp16 sections, fp32 without; fp16 needs "
                          "a GPU)")
    run.add_argument("--wd", type=_non_negative, default=None,
                     help="weight decay (default: the ds config's optimizer.params.weight_decay)")
    run.add_argument("--warmup", type=_non_negative_int, default=None,
                     help=f"learning-rate warm-up steps (default: the ds config's scheduler.params.warmup_num_steps; "
                          f"'auto' = {WARMUP_FRACTION * 100:g}%% of the run)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimizer steps (default: {SYNTHETIC_PRESET['steps']} on the synthetic benchmark, "
                             f"{REAL_DATA_EPOCHS:g} epoch on real data)")
    length.add_argument("--epochs", type=_positive, default=None,
                        help=f"passes over the training split (default: {REAL_DATA_EPOCHS:g} on real data; --steps on "
                             f"the synthetic benchmark)")
    run.add_argument("--lr", type=_learning_rate, default=None,
                     help=f"peak learning rate, in (0, {MAX_LR:g}] (default: the ds config's optimizer.params.lr)")
    run.add_argument("--accum-freq", type=_positive_int, default=None,
                     help="micro-batches per optimizer step (default: the ds config's gradient_accumulation_steps; sets "
                          "it, keeping its train_batch_size); the contrastive losses see the whole accumulated batch "
                          "as negatives")
    run.add_argument("--deterministic", action="store_true",
                     help="bitwise-reproducible runs on GPU too (slower): torch deterministic algorithms, "
                          "CUBLAS_WORKSPACE_CONFIG=:4096:8, the patch-sentence backward without atomics and, on CUDA, "
                          "math ViT attention and eager BERT attention (CPU runs are reproducible without it)")
    run.add_argument("--seed", type=int, default=None,
                     help="seed of data order, masking and initialisation (default 0; a resumed run takes its "
                          "checkpoint's, and refuses another)")
    run.add_argument("--eval-every", type=_non_negative_int, default=None,
                     help=f"zero-shot evaluation on the validation split every N steps (0: only at the end; default "
                          f"{SYNTHETIC_PRESET['eval_every']})")
    run.add_argument("--eval-max-samples", type=_non_negative_int, default=0,
                     help="cap on evaluation samples per split (0: all)")
    run.add_argument("--no-final-eval", action="store_true", help="skip the end-of-run evaluation on the test split")
    run.add_argument("--diagnose", action="store_true",
                     help="with --data synthetic: at every validation point and at the end, the integrity mode's "
                          "diagnostics (finding-patch AUC of its estimator and of its target, finding patches kept, "
                          "weight CV; mlip_fast.eval.integrity) in the eval records of metrics.jsonl and summary.json")
    run.add_argument("--save-every", type=_non_negative_int, default=None,
                     help=f"checkpoint every N steps (0: only at the end; default {SYNTHETIC_PRESET['save_every']}); a "
                          f"checkpoint is always written at the end")
    run.add_argument("--keep-checkpoints", type=_non_negative_int, default=2,
                     help="checkpoints kept on disk (0: keep all)")
    run.add_argument("--log-every", type=_positive_int, default=1, help="metrics.jsonl line every N steps")
    run.add_argument("--profile-steps", type=_non_negative_int, default=0,
                     help="torch.profiler trace of N steps after 5 warm-up steps, into <run>/profile/ (trace.json for "
                          "chrome://tracing or Perfetto, ops.txt by op time; rank 0)")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="run folder (default runs/<run-name>)")
    out.add_argument("--run-name", default=None, help="run folder name under runs/ (default: a timestamp)")
    out.add_argument("--resume", default=None,
                     help="'latest' (the newest checkpoint of --output-dir, or of the newest run under runs/) or a "
                          "checkpoint folder")
    out.add_argument("--report-to", choices=REPORT_TO, default="none",
                     help="also log the metrics through DeepSpeed's monitor: TensorBoard events in the run folder, or "
                          "W&B (project mlip_fast, group = the run name); the package is checked before anything starts")
    out.add_argument("--tensorboard", action="store_true", help=argparse.SUPPRESS)  # older spelling of --report-to
    out.add_argument("--no-progress", action="store_true",
                     help="no progress display (a bar on a terminal, else a plain line every twentieth of the run)")

    ds = p.add_argument_group("DeepSpeed")
    ds.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="FILE_OR_NAME",
                    help="DeepSpeed JSON config (required): a file, or the name of one shipped with the package: "
                         f"{', '.join(shipped_ds_configs())} (ds.json of a source checkout is zero2_fp32)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    # accepted for scripts written for DeepSpeed's add_config_arguments; they change nothing
    p.add_argument("--deepspeed", "--deepscale", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, argv)
    args = parser.parse_args(argv)
    if args.tensorboard:
        if args.report_to not in ("none", "tensorboard"):
            parser.error(f"--tensorboard and --report-to {args.report_to} disagree; use --report-to only")
        args.report_to = "tensorboard"
    if args.deepspeed_config is None:
        try:  # a wrong model is the first thing to hear of, not the missing DeepSpeed config
            get_model_config(args.model)
        except ConfigError as e:
            parser.error(str(e))
        parser.error("--deepspeed_config is required: a DeepSpeed JSON file or a shipped name such as zero2_fp32")
    if args.warmup is not None and args.steps is not None and args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    synthetic = args.data == "synthetic"
    for key, value in SYNTHETIC_PRESET.items():
        if getattr(args, key) is None and (synthetic or key in ("eval_every", "save_every", "synthetic_n")):
            if (key == "steps" and args.epochs is not None) or (key == "ot_eps" and args.local_matching != "ot"):
                continue  # --epochs decides the length; the OT regularisation only where the matching is OT
            setattr(args, key, value)
    if args.sie_target is not None:
        if args.sie_mode is not None and args.sie_mode != args.sie_target:
            parser.error(f"--sie-target {args.sie_target} contradicts --sie-mode {args.sie_mode}: --sie-target is the "
                         f"older spelling of --sie-mode; give --sie-mode only")
        args.sie_mode = args.sie_target
    if args.diagnose and args.data != "synthetic":
        parser.error("--diagnose needs --data synthetic (its findings have masks)")
    if args.sie_warmup is not None and args.steps is not None and args.sie_warmup >= args.steps:
        parser.error(f"--sie-warmup {args.sie_warmup} must be below --steps {args.steps} (the integrity mode would "
                     f"never act)")
    if args.lambda_local is None:
        args.lambda_local = SPEC_LAMBDA_LOCAL
    if args.in_memory is None:
        args.in_memory = False
    if args.steps is None and args.epochs is None:
        args.epochs = REAL_DATA_EPOCHS
    return args
