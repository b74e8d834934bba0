"""Run set-up of the training app, before any data or model: the checks that need nothing but the command line
(:func:`preflight`), the model config the flags describe, the run folder and the checkpoint a run resumes
from, the seed, and the :class:`RunState` that the later phases (:mod:`mlip_fast.train.run`) share.

One run per folder: rank 0 holds the folder's run lock for the whole run, a folder that holds a run is refused
without ``--resume``, and a resume must match the recorded seed and data (see
:mod:`mlip_fast.train.run_folder`). The checkpoint a run resumes from is proven before anything slow
(:func:`mlip_fast.train.checkpoint.choose_checkpoint`); ``--resume latest`` on a folder whose run stopped before
its first checkpoint starts that run again from scratch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from mlip_fast.data.sources import check_data_exists
from mlip_fast.models import get_model_config
from mlip_fast.models.config import ConfigError, MLIPConfig
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import ds_config as dsc
from mlip_fast.train.compile import check_compile
from mlip_fast.train.process import Ranks, on_rank0, require_deepspeed
from mlip_fast.train.reporting import RunReporter, check_monitors
from mlip_fast.train.run_folder import RunLock, check_run_folder
from mlip_fast.train.signals import StopRequest
from mlip_fast.train.timing import PhaseTimes

__all__ = ["RUNS_ROOT", "DEFAULT_SEED", "Resume", "Claim", "RunState", "preflight", "model_config",
           "claim_run_folder", "resolve_seed", "total_steps"]

RUNS_ROOT = Path("runs")
DEFAULT_SEED = 0
# What a checkpoint's client state says about the run, compared when resuming.
RESUME_KEYS = ("step", "num_train", "global_batch", "data_order", "seed", "data_fingerprint")


@dataclass
class Resume:
    """The checkpoint a run continues from: its folder (``root``, the run's ``checkpoints/``), ``tag`` and
    what its client state recorded (``saved``: the keys of ``RESUME_KEYS`` it has)."""

    root: str
    tag: str
    saved: dict

    @property
    def step(self) -> int:
        return int(self.saved["step"])

    @property
    def run_dir(self) -> Path:
        """The folder of the run that wrote the checkpoint."""
        return Path(self.root).parent

    def __str__(self) -> str:
        return f"{self.root}/{self.tag}"


@dataclass
class RunState:
    """What every phase of a run reads: the parsed arguments, the resolved DeepSpeed config (batch sizes known;
    the schedule is resolved once the data gives the run's length), the model config, the run folder and its
    reporter, the checkpoint resumed from, where this process sits, and when the run started."""

    args: object
    config: dict
    model_cfg: MLIPConfig
    reporter: RunReporter
    run_dir: Path
    resume: Optional[Resume]
    ranks: Ranks
    device_type: str
    started: float = field(default_factory=time.perf_counter)
    stop: Optional[StopRequest] = None
    phase: str = "start-up"  # then "training", then "finish" (after the final checkpoint)
    step: Optional[int] = None  # the step of the final checkpoint, once saved
    checkpoint: Optional[str] = None
    times: PhaseTimes = field(default_factory=PhaseTimes)  # where the run's wall time goes (summary.json)

    @property
    def micro(self) -> int:
        return self.config["train_micro_batch_size_per_gpu"]

    @property
    def accum(self) -> int:
        return self.config["gradient_accumulation_steps"]

    @property
    def global_batch(self) -> int:
        return self.config["train_batch_size"]

    @property
    def zero_stage(self) -> int:
        return self.config.get("zero_optimization", {}).get("stage", 0)

    @property
    def rank(self) -> int:
        return self.ranks.rank

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


def output_dir(args) -> Path:
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.resume is not None and args.run_name is None:  # continue the run that wrote the checkpoint
        root, _ = ckpt.resolve_resume(args.resume, None, RUNS_ROOT)
        return root.parent
    return RUNS_ROOT / (args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))


def model_config(args, device_type: str = "cpu") -> MLIPConfig:
    """The model config of ``--model`` with ``--model-overrides``, ``--image-size``, ``--vit-registers``, ``--attn``, ``--mask-ratio``,
    ``--text-dropout`` / ``--text-attention-dropout``, ``--local-matching`` / ``--ot-eps`` / ``--ot-iters``, ``--sie-mode`` / ``--sie-warmup`` and
    the attention choices
    ``--deterministic`` needs on CUDA."""
    cfg = get_model_config(args.model)
    overrides = dict(args.model_overrides or {})
    vision = dict(overrides.pop("vision", {}))
    if args.image_size is not None:
        vision.setdefault("image_size", args.image_size)
    if getattr(args, "vit_registers", None) is not None:
        vision.setdefault("registers", args.vit_registers)
    attn = args.attn
    if args.deterministic and device_type == "cuda":
        # the fused attention kernels' backward accumulates with atomics (docs/training.md, Reproducibility)
        if attn not in ("auto", "math"):
            raise ConfigError(f"--attn {attn} has a nondeterministic backward on CUDA; --deterministic needs --attn "
                              f"math (or auto, which then takes math)")
        attn = "math"
        overrides["text"] = {"attn_implementation": "eager", **overrides.get("text", {})}
    vision.setdefault("attn_backend", attn)
    overrides["vision"] = vision
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    for flag, key in (("text_dropout", "dropout"), ("text_attention_dropout", "attention_dropout")):
        if getattr(args, flag, None) is not None:  # --model-overrides' text keys win
            overrides["text"] = {key: getattr(args, flag), **overrides.get("text", {})}
    for name in ("local_matching", "ot_eps", "ot_iters", "sie_mode", "sie_warmup"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    cfg = cfg.replace(**overrides)
    if getattr(args, "diagnose", False) and cfg.mask_ratio == 0.0:
        raise ConfigError("--diagnose measures the integrity mode's masking and weights: it needs a mask ratio > 0")
    if cfg.local_matching != "ot" and (getattr(args, "ot_eps", None) or getattr(args, "ot_iters", None)):
        raise ConfigError("--ot-eps / --ot-iters set the optimal-transport matching, but the local matching is "
                          f"{cfg.local_matching!r}: add --local-matching ot")
    return cfg


def total_steps(args, steps_per_epoch: int) -> int:
    if args.steps is not None:
        return int(args.steps)
    return max(1, int(round(args.epochs * steps_per_epoch)))


def preflight(args, device_type: str) -> tuple:
    """Every check that needs no process group, data or model, so that a mistake costs seconds and not a data
    generation: the DeepSpeed config (a file or a shipped name, with ``--batch-size`` / ``--precision`` /
    ``--wd`` / ``--warmup`` mapped onto it, then validated as a whole against the device), the monitors it and
    ``--report-to`` ask for (their packages installed), the model config
    (``--model``, ``--model-overrides``, ``--image-size``, ...), that ``--data`` exists and the ``--pretrained``
    weights' path.

    Returns (ds config, model config, the flag overrides as ``"key: old -> new"``); raises the usage errors
    that ``mlip_fast.train.main.main`` turns into one line on stderr and exit code 2.
    """
    require_deepspeed()
    where = str(dsc.resolve_ds_config(args.deepspeed_config))
    raw_config = dsc.load_ds_config(where)
    raw_config, changes = dsc.apply_flag_overrides(raw_config, batch_size=args.batch_size, precision=args.precision,
                                                   weight_decay=args.wd, warmup=args.warmup, where=where)
    dsc.validate_ds_config(raw_config, device_type=device_type, where=where)
    raw_config = dsc.apply_accum_freq(raw_config, args.accum_freq)
    zero_stage = raw_config.get("zero_optimization", {}).get("stage", 0)
    if zero_stage not in (1, 2, 3):
        raise dsc.DSConfigError(f"{where}: zero_optimization.stage must be 1, 2 or 3 for this training app "
                                f"(got {zero_stage}); stage 1 is plain data parallelism with sharded optimizer states")
    check_monitors(raw_config, args.report_to, where)
    model_cfg = model_config(args, device_type)
    check_compile(args, device_type)
    if args.data != "synthetic":
        check_data_exists(args.data)
    pretrained = args.pretrained
    if pretrained is not None and not str(pretrained).startswith("hf-hub:") and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"--pretrained {pretrained!r} does not exist (ViT weights: a local file or folder, or "
                          f"hf-hub:<repo id>)")
    return raw_config, model_cfg, changes


@dataclass
class Claim:
    """What rank 0 decided about the run folder: the folder, the checkpoint to resume from (None: a fresh start),
    rank 0's run lock, the stale lock it took over, whether ``--resume latest`` restarts a run that stopped
    before its first checkpoint, and the checkpoints rejected on the way (each with why)."""

    run_dir: Path
    resume: Optional[Resume]
    lock: Optional[RunLock]
    stale_lock: Optional[dict]
    restart: bool = False
    rejected: list = field(default_factory=list)


def _find_checkpoint(args, run_dir: Path, ranks: Ranks, zero_stage: int) -> tuple:
    """(Resume or None, restart, rejected) for ``--resume``; see :func:`claim_run_folder`."""
    try:
        root, tag = ckpt.resolve_resume(args.resume, run_dir if args.resume == "latest" else None, RUNS_ROOT)
    except ckpt.NoCheckpointYet:
        finished = [n for n in ("summary.json", ckpt.EXPORT_DIR) if (run_dir / n).exists()]
        if finished:  # a finished run whose checkpoints are gone: restarting would overwrite its records
            raise ckpt.CheckpointError(f"--resume latest: {run_dir} holds a finished run ({', '.join(finished)}) but "
                                       f"no checkpoint to continue it from; choose another --output-dir") from None
        return None, True, []
    # a checkpoint named by its own folder must pass; one reached through ``latest`` may give way to an older one
    named = args.resume != "latest" and Path(args.resume).resolve() == (Path(root) / tag).resolve()
    tag, state, rejected = ckpt.choose_checkpoint(root, tag, ranks.world, zero_stage, fall_back=not named)
    return Resume(str(root), tag, {k: state[k] for k in RESUME_KEYS if k in state}), False, rejected


def claim_run_folder(args, ranks: Ranks, zero_stage: int) -> Claim:
    """Decided on rank 0 and shared with every rank; rank 0 holds the folder's run lock from here on (the caller
    releases it). The checkpoint ``--resume`` names is proven first (files against the manifest, pickles read
    weights-only); with ``latest``, one that fails is passed over for the previous complete one, and a run folder
    with no checkpoint at all is restarted from scratch. Under the lock, a killed run's leftovers are removed
    before anything is written."""
    held = {}

    def claim():
        run_dir = output_dir(args)
        found, restart, rejected = (None, False, []) if args.resume is None else \
            _find_checkpoint(args, run_dir, ranks, zero_stage)
        check_run_folder(run_dir, resuming=found is not None or restart,
                         checkpoint_run=found.run_dir if found is not None else None)
        root = run_dir / ckpt.CHECKPOINT_DIR
        held["lock"] = RunLock(run_dir).acquire(cleanup=lambda: ckpt.remove_leftovers(root))
        if restart:
            ckpt.set_aside_newer(root, None)  # a first save killed before ``latest`` was written
        return Claim(run_dir, found, None, held["lock"].stale, restart, rejected)

    claimed = on_rank0(claim, ranks.rank)
    claimed.lock = held.get("lock")
    return claimed


def resolve_seed(seed: Optional[int], resume: Optional[Resume]) -> int:
    """``--seed``, else the resumed checkpoint's seed, else ``DEFAULT_SEED``; a resume with another seed than
    its checkpoint's is refused (the data order and masking would not continue)."""
    saved = resume.saved.get("seed") if resume is not None else None
    if seed is None:
        return DEFAULT_SEED if saved is None else int(saved)
    if saved is not None and int(saved) != seed:
        raise ckpt.CheckpointError(f"checkpoint {resume} was trained with --seed {saved}; this run asks "
                                   f"for --seed {seed}. Resume with --seed {saved} (or leave --seed out)")
    return seed
