"""Entry point of the training app: ``deepspeed train.py --deepspeed_config ds.json [options]``.

:func:`train` does the work and returns the run summary (tests call it in-process); :func:`main` wraps it
with exit codes and a clean process exit:

====  ======================================================================================
0     success (summary.json written)
1     unexpected error (traceback printed)
2     bad usage: arguments, DeepSpeed config, model config, data or checkpoint (message printed)
3     non-finite loss: stopped, the last good state is checkpointed
130   stopped by SIGINT, 143 by SIGTERM (or by the DeepSpeed launcher ending): a checkpoint was saved
      first (``--resume latest``); also 130 when a second stop interrupted without a checkpoint
====  ======================================================================================

One run per folder: rank 0 holds the folder's run lock for the whole run, a folder that holds a run is
refused without ``--resume``, and a resume must match the recorded seed and data (see
:mod:`mlip_fast.train.run_folder`).

Exit. With several processes on CPU, DeepSpeed's shared-memory all-reduce op can abort the interpreter
at exit after a successful run. The app never builds that op (the collectives go through gloo; it only
serves DeepSpeed's inference all-reduce), and :func:`main` ends with ``barrier``,
``destroy_process_group`` and ``os._exit`` after flushing every output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mlip_fast._records import versions
from mlip_fast.data.readers import DatasetError, EvalDataError
from mlip_fast.data.sources import check_data_exists
from mlip_fast.losses import MLIPLoss
from mlip_fast.models import create_model, from_pretrained, get_model_config, get_tokenizer, write_model_card
from mlip_fast.models.attention import backend_report, selected_backend
from mlip_fast.models.config import ConfigError
from mlip_fast.models.factory import CheckpointError as ModelCheckpointError
from mlip_fast.models.hub import default_preprocess
from mlip_fast.models.vit_weights import PretrainedWeightsError
from mlip_fast.ops.dispatch import ImplUnavailableError, describe_selected
from mlip_fast.preprocess.tokenization import load_tokenizer
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import data as tdata
from mlip_fast.train import ds_config as dsc
from mlip_fast.train.args import parse_args
from mlip_fast.train.evaluation import EvalSets, localisation, precision_context, zero_shot
from mlip_fast.train.loop import LoopContext, NonFiniteLossError, TrainingStopped, train_loop
from mlip_fast.train.reporting import RunReporter, plot_metrics
from mlip_fast.train.run_folder import RunFolderError, RunLock, check_run_folder
from mlip_fast.train.signals import StopRequest, watch_launcher

__all__ = ["train", "main", "preflight", "usage_errors", "device_type_name", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_NON_FINITE"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NON_FINITE = 0, 1, 2, 3
RUNS_ROOT = Path("runs")
DEFAULT_SEED = 0
# What a checkpoint's client state says about the run, compared when resuming.
_RESUME_KEYS = ("step", "num_train", "global_batch", "data_order", "seed", "data_fingerprint")


# ---------------------------------------------------------------------------------------------- distributed
class LaunchError(RuntimeError):
    """The processes could not form their group (e.g. the rendezvous port is taken)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed() -> tuple:
    """(rank, world size, local rank, local world size) after initialising torch.distributed through
    DeepSpeed (gloo on CPU, NCCL on GPU). A plain ``python train.py`` runs as a world of one."""
    import deepspeed
    import deepspeed.ops

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed's CPU shared-memory all-reduce op only serves inference all-reduce; building it costs a JIT
    # compile and, with several processes, it can abort the interpreter at exit. gloo does the collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(verbose=False)
        except dist.DistNetworkError as e:
            raise LaunchError(f"cannot start the process group at {os.environ.get('MASTER_ADDR')}:"
                              f"{os.environ.get('MASTER_PORT')} ({e}); another run probably uses this port: pass "
                              f"--master_port <free port> to the deepspeed launcher") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    return rank, world, local_rank, local_world


def _rank0(fn, rank: int):
    """Runs ``fn`` on rank 0 and gives every rank its result, or raises its exception on every rank (so
    that a decision such as "this checkpoint is corrupted" stops all processes alike)."""
    payload = [None]
    if rank == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # re-raised below, on every rank
            payload = [("error", e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- set-up
def device_type_name() -> str:
    """The accelerator DeepSpeed picked: "cuda", "cpu", ..."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _output_dir(args) -> Path:
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.resume is not None and args.run_name is None:  # continue the run that wrote the checkpoint
        root, _ = ckpt.resolve_resume(args.resume, None, RUNS_ROOT)
        return root.parent
    return RUNS_ROOT / (args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))


def _model_config(args, device_type: str = "cpu"):
    cfg = get_model_config(args.model)
    overrides = dict(args.model_overrides or {})
    vision = dict(overrides.pop("vision", {}))
    if args.image_size is not None:
        vision.setdefault("image_size", args.image_size)
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
    return cfg.replace(**overrides)


def _tokenizer(cfg, corpus_fn, run_dir: Path, rank: int, resumed_run: Optional[Path] = None):
    """The run's tokenizer: built once by rank 0 (a WordPiece vocabulary trained on the training reports
    for a random-init text tower, else the pretrained tower's) into ``run_dir/tokenizer`` and loaded from
    there by every rank, so all ranks tokenize identically. A resumed run takes the tokenizer of the run
    that wrote its checkpoint."""
    folder = run_dir / "tokenizer"

    def build():
        if not (folder / "tokenizer.json").is_file():
            previous = resumed_run / "tokenizer" if resumed_run is not None else None
            if previous is not None and (previous / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(previous)
            else:
                tokenizer = get_tokenizer(cfg, corpus=corpus_fn() if cfg.text.source == "random" else None)
            tmp = folder.with_name(f".tokenizer.tmp-{os.getpid()}")
            try:
                tokenizer.save_pretrained(str(tmp))
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(folder)

    return load_tokenizer(_rank0(build, rank))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices only (not on biases, norms, logit scales), as open_clip."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _wants_tensorboard(config: dict, args) -> bool:
    return bool(args.tensorboard or config.get("tensorboard", {}).get("enabled", False))


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (DeepSpeed's monitor writes through torch.utils.tensorboard)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise dsc.DSConfigError(f"TensorBoard logging was requested but tensorboard is not installed ({e}); "
                                f"pip install tensorboard, or drop --tensorboard / the 'tensorboard' section") from None


def _tensorboard(config: dict, args, run_dir: Path) -> dict:
    if not _wants_tensorboard(config, args):
        return config
    section = dict(config.get("tensorboard", {}))
    section.update(enabled=True)
    section.setdefault("output_path", str(run_dir / "tensorboard"))
    section.setdefault("job_name", run_dir.name)
    return {**config, "tensorboard": section}


def _total_steps(args, steps_per_epoch: int) -> int:
    if args.steps is not None:
        return int(args.steps)
    return max(1, int(round(args.epochs * steps_per_epoch)))


def preflight(args, device_type: str) -> tuple:
    """Every check that needs no process group, data or model, so that a mistake costs seconds and not a data
    generation: the DeepSpeed config (a file or a shipped name, with ``--batch-size`` / ``--precision`` /
    ``--wd`` / ``--warmup`` mapped onto it, then validated as a whole against the device), the model config
    (``--model``, ``--model-overrides``, ``--image-size``, ...), that ``--data`` exists and the ``--pretrained``
    weights' path.

    Returns (ds config, model config, the flag overrides as ``"key: old -> new"``); raises the usage errors
    that :func:`main` turns into one line on stderr and exit code 2.
    """
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
    if _wants_tensorboard(raw_config, args):
        _require_tensorboard()
    model_cfg = _model_config(args, device_type)
    if args.data != "synthetic":
        check_data_exists(args.data)
    pretrained = args.pretrained
    if pretrained is not None and not str(pretrained).startswith("hf-hub:") and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"--pretrained {pretrained!r} does not exist (ViT weights: a local file or folder, or "
                          f"hf-hub:<repo id>)")
    return raw_config, model_cfg, changes


# ---------------------------------------------------------------------------------------------- train
def train(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs one training job (see the module docstring) and returns its summary dict."""
    start = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.deterministic:  # read when cuBLAS starts: before anything touches CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device_type = device_type_name()
    raw_config, model_cfg, flag_changes = preflight(args, device_type)  # before any process group exists
    where = str(dsc.resolve_ds_config(args.deepspeed_config))
    zero_stage = raw_config.get("zero_optimization", {}).get("stage", 0)

    rank, world, local_rank, local_world = _init_distributed()
    if "OMP_NUM_THREADS" not in os.environ and device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    config = dsc.resolve_batch_sizes(raw_config, world, where)
    micro, accum, global_batch = (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                                  config["train_batch_size"])

    lock = None

    def claim_run_folder():
        """(run folder, resume or None, stale lock or None); holds the folder's run lock from here on."""
        run_dir = _output_dir(args)
        found = None
        if args.resume is not None:
            root, tag = ckpt.resolve_resume(args.resume, run_dir if args.resume == "latest" else None, RUNS_ROOT)
            state = ckpt.verify_checkpoint(root, tag, world, zero_stage)
            found = (str(root), tag, {k: state[k] for k in _RESUME_KEYS if k in state})
        check_run_folder(run_dir, resuming=found is not None,
                         checkpoint_run=Path(found[0]).parent if found is not None else None)
        nonlocal lock
        lock = RunLock(run_dir).acquire()
        return str(run_dir), found, lock.stale

    run_dir, resume, stale_lock = _rank0(claim_run_folder, rank)
    run_dir = Path(run_dir)
    try:
        args.seed = _resolve_seed(args.seed, resume)
        reporter = RunReporter(run_dir, rank, progress=not args.no_progress)
        try:
            if stale_lock:
                reporter.log("took over the stale run lock of pid %s on %s (that process no longer runs)",
                             stale_lock.get("pid"), stale_lock.get("host"))
            if flag_changes:
                reporter.log("ds config %s with the flags mapped onto it: %s", where, "; ".join(flag_changes))
            with _deterministic_algorithms(args.deterministic):
                return _train(args, config, model_cfg, reporter, run_dir, resume, rank, world, local_rank, micro,
                              accum, global_batch, zero_stage, device_type, start)
        finally:
            reporter.close()
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` for the run when ``enabled``, the previous mode after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _resolve_seed(seed: Optional[int], resume) -> int:
    """``--seed``, else the resumed checkpoint's seed, else ``DEFAULT_SEED``; a resume with another seed than
    its checkpoint's is refused (the data order and masking would not continue)."""
    saved = resume[2].get("seed") if resume is not None else None
    if seed is None:
        return DEFAULT_SEED if saved is None else int(saved)
    if saved is not None and int(saved) != seed:
        raise ckpt.CheckpointError(f"checkpoint {resume[0]}/{resume[1]} was trained with --seed {saved}; this run asks "
                                   f"for --seed {seed}. Resume with --seed {saved} (or leave --seed out)")
    return seed


def _check_resume_data(resume, train_set, global_batch: int, fingerprint: str, sampler) -> None:
    """Refuses a resume whose training data or batch layout differ from the checkpoint's, naming each
    difference (checkpoints that predate a record are not compared on it)."""
    saved = resume[2]
    now = {"num_train": len(train_set), "data_fingerprint": fingerprint, "global_batch": global_batch,
           "data_order": sampler.signature()}
    labels = {"num_train": "training samples", "data_fingerprint": "training data fingerprint",
              "global_batch": "global batch", "data_order": "data order"}
    differ = [f"{labels[k]} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if differ:
        raise ckpt.CheckpointError(f"checkpoint {resume[0]}/{resume[1]} does not match this run: {'; '.join(differ)}. "
                                   f"Resume with the same data (--data, --image-root), ds config, --num-workers and "
                                   f"--shuffle-buffer, or start a new run")


def _train(args, config, model_cfg, reporter, run_dir, resume, rank, world, local_rank, micro, accum, global_batch,
           zero_stage, device_type, start) -> dict:
    import deepspeed

    reporter.log("run folder: %s (%d process(es), %s)", run_dir, world, device_type)
    if resume is not None:
        reporter.log("resuming from %s/%s (step %d)", resume[0], resume[1], resume[2]["step"])
        reporter.record("event", event="resume", checkpoint=f"{resume[0]}/{resume[1]}", step=resume[2]["step"])

    # data -----------------------------------------------------------------------------------------
    synthetic_root = None
    data = args.data
    if data == "synthetic":
        size = model_cfg.vision.image_size
        master = None
        if local_rank == 0:
            master = tdata.prepare_synthetic(Path(args.cache_dir), size, args.synthetic_n, args.synthetic_seed,
                                             workers=max(1, min(2, os.cpu_count() or 1)), log=reporter.log)
        _barrier()
        master = tdata.synthetic_cache_dir(Path(args.cache_dir), size, args.synthetic_n, args.synthetic_seed) / "master.csv"
        data, synthetic_root = str(master), master.parent
    v = model_cfg.vision
    # the preprocessing the export stores (preprocess_config.json) is the one the run trains with
    train_tf, eval_tf = default_preprocess(model_cfg).transforms()
    kw = dict(image_root=args.image_root, max_bad_fraction=args.max_bad_fraction)
    train_set = tdata.build_pretrain_dataset(data, "train", train_tf, **kw)
    eval_sets = EvalSets(tdata.build_pretrain_dataset(data, "valid", eval_tf, **kw),
                         tdata.build_pretrain_dataset(data, "test", eval_tf, **kw),
                         "synthetic" if synthetic_root is not None else "chexpert5", synthetic_root)
    reporter.log("data: %s: %d training pairs, %s validation, %s test", data, len(train_set),
                 len(eval_sets.valid) if eval_sets.valid is not None else "no", len(eval_sets.test) if eval_sets.test is not None else "no")
    splits = {"train": train_set, "valid": eval_sets.valid, "test": eval_sets.test}
    skipped = {split: _report_skipped(reporter, split, ds, reprobe=False) for split, ds in splits.items()}
    fingerprint = tdata.data_fingerprint(train_set)
    sampler = tdata.make_batch_plan(train_set, micro, accum, rank, world, args.seed, args.num_workers, args.shuffle_buffer)
    total_steps = _total_steps(args, sampler.steps_per_epoch)
    ckpt_root = run_dir / ckpt.CHECKPOINT_DIR
    if resume is not None:
        _check_resume_data(resume, train_set, global_batch, fingerprint, sampler)
        if resume[2]["step"] > total_steps:
            raise ckpt.CheckpointError(f"checkpoint is at step {resume[2]['step']}, beyond this run's {total_steps} steps")
        if rank == 0 and Path(resume[0]).resolve() == ckpt_root.resolve():
            # the run continues from its checkpoint: what it wrote after that step is redone
            for moved in ckpt.set_aside_newer(ckpt_root, resume[1]):
                reporter.log("set aside %s: it is newer than the checkpoint this run resumes from", moved)
            dropped = reporter.rewind(resume[2]["step"])
            if dropped:
                reporter.log("metrics.jsonl: dropped %d record(s) of the steps after %d (they are redone)", dropped,
                             resume[2]["step"])

    # model ----------------------------------------------------------------------------------------
    tokenizer = _tokenizer(model_cfg, lambda: tdata.report_corpus(train_set), run_dir, rank,
                           Path(resume[0]).parent if resume is not None else None)
    torch.manual_seed(args.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    model = create_model(model_cfg, tokenizer=tokenizer, image_pretrained=args.pretrained)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    _lock_towers(model, args, reporter)
    model_cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    criterion = MLIPLoss(lambda_local=args.lambda_local, lambda_sie=args.lambda_sie, sie_temperature=args.sie_temperature,
                         impl=args.impl, deterministic=args.deterministic)
    if args.deterministic:
        reporter.log("deterministic: torch deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=%s, patch-sentence backward "
                     "without atomics, ViT attention %s, text attention %s", os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     model_cfg.vision.attn_backend, model_cfg.text.attn_implementation)
    collate = tdata.make_collator(tokenizer, model_cfg.text.max_length, model_cfg.text.max_sentences)

    config = dsc.resolve_schedule(config, total_steps)
    if args.lr is not None:
        config["optimizer"]["params"]["lr"] = args.lr
    config = _tensorboard(config, args, run_dir)
    weight_decay = config["optimizer"]["params"].get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           config=config)
    dtype = dsc.precision_dtype(config)
    start_step = 0
    if resume is not None:
        state = ckpt.load_checkpoint(engine, Path(resume[0]), resume[1])
        start_step = int(state["step"])
    sampler.start_step = start_step
    reporter.log("model %s: %.2fM parameters; image %d px, %d patches, mask ratio %.2f; text %s", model_cfg.name,
                 n_params / 1e6, v.image_size, model_cfg.vision.num_patches,
                 model_cfg.mask_ratio, model_cfg.text.source)
    reporter.log("DeepSpeed: ZeRO stage %d, %s, global batch %d = micro %d x accumulation %d x %d process(es), "
                 "%d steps (%.1f epochs of %d steps), peak lr %g", zero_stage, str(dtype).replace("torch.", ""),
                 global_batch, micro, accum, world, total_steps, total_steps / sampler.steps_per_epoch,
                 sampler.steps_per_epoch, config["optimizer"]["params"]["lr"])
    reporter.log("ViT attention backends on %s: %s", device_type, backend_report(device_type, dtype))

    backends = {}

    def on_first_step():
        backends.update(vit_attention=selected_backend(), text_attention=model_cfg.text.attn_implementation,
                        ops=describe_selected())
        reporter.log("attention backend: ViT %s, text %s; fused op impls: %s", backends["vit_attention"],
                     backends["text_attention"], backends["ops"])
        reporter.record("event", event="backends", **backends)

    # checkpoints and evaluation -----------------------------------------------------------------------
    checkpointer = ckpt.Checkpointer(ckpt_root, keep=args.keep_checkpoints,
                                     resumed=(Path(resume[0]), resume[1]) if resume is not None else None)
    saved_steps = {}

    def save(step: int) -> str:
        if step in saved_steps:
            return saved_steps[step]
        epoch, in_epoch = sampler.position(step)
        client = dict(step=step, epoch=epoch, step_in_epoch=in_epoch, samples_seen=step * global_batch,
                      world_size=world, zero_stage=zero_stage, global_batch=global_batch, num_train=len(train_set),
                      data_order=sampler.signature(), data_fingerprint=fingerprint,
                      seed=args.seed, args=vars(args))
        path = checkpointer.save(engine, step, client)
        saved_steps[step] = str(path)
        reporter.record("event", event="checkpoint", step=step, path=str(path))
        return str(path)

    eval_history = []

    def evaluate(step: int, split: str = "valid") -> Optional[dict]:
        dataset = eval_sets.zero_shot_set(split)
        if dataset is None:
            return None
        participate = zero_stage == 3 or rank == 0
        result = None
        if participate:
            with precision_context(dtype, device_type):
                result = _or_skip(reporter, f"step {step}: {split} zero-shot evaluation", zero_shot, engine.module,
                                  dataset, eval_sets.prompts, max_samples=args.eval_max_samples)
        _barrier()
        if result is not None and rank == 0:
            eval_history.append({"step": step, "split": split, "auc_macro": result["auc_macro"]})
            reporter.log("step %d: %s zero-shot macro AUC %.3f (chance 0.5); %s", step, split, result["auc_macro"],
                         ", ".join(f"{k} {v:.3f}" for k, v in result["auc"].items() if v is not None))
            reporter.record("eval", step=step, split=split, auc_macro=result["auc_macro"], auc=result["auc"],
                            accuracy_macro=result["accuracy_macro"], f1_macro=result["f1_macro"],
                            n_images=result["n_images"])
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"Eval/{split}_auc_macro", result["auc_macro"], step)])
        return result

    # training -------------------------------------------------------------------------------------
    loader = tdata.make_train_loader(train_set, sampler, collate, args.num_workers)
    batches = iter(loader)
    stop = StopRequest().install()
    launcher_watch = watch_launcher(stop)
    monitor = engine.monitor.write_events if engine.monitor.enabled else None
    ctx = LoopContext(engine=engine, criterion=criterion, batches=batches, reporter=reporter, stop=stop,
                      seed=args.seed, rank=rank, world_size=world, accumulation=accum, global_batch=global_batch,
                      steps_per_epoch=sampler.steps_per_epoch, total_steps=total_steps, start_step=start_step,
                      dtype=dtype, log_every=args.log_every, eval_every=args.eval_every,
                      save_every=args.save_every, evaluate=evaluate, save=save, on_first_step=on_first_step,
                      monitor=monitor)
    setup_s = time.perf_counter() - start
    try:
        result = train_loop(ctx)
    except DatasetError:
        # raised in a loader worker, which knows only its own bad items: name every one from here
        if not hasattr(train_set, "bad_summary"):
            raise
        raise DatasetError(train_set.bad_summary(reprobe=True)) from None
    finally:
        launcher_watch.close()
        stop.uninstall()
        del batches  # shuts the loader's workers down before anything else can exit the process
    reporter.log("training: %d steps in %.1f s (%.1f samples/s)", result.steps - start_step, result.wall_s,
                 result.samples / max(result.wall_s, 1e-9))
    _merge_bad_items(train_set)
    final_ckpt = save(result.steps)
    _barrier()

    # export and final evaluation (rank 0) -----------------------------------------------------------------
    export_dir = run_dir / ckpt.EXPORT_DIR
    summary = None
    if rank == 0:
        t_export = time.perf_counter()
        fresh = create_model(model_cfg, tokenizer=tokenizer)
        ckpt.export_consolidated(ckpt_root, ckpt.tag_for(result.steps), fresh, export_dir)
        exported = from_pretrained(export_dir)
        reporter.log("exported consolidated fp32 weights to %s (%.1f s)", export_dir, time.perf_counter() - t_export)
        final = {}
        t_eval = time.perf_counter()
        if not args.no_final_eval:
            test = eval_sets.zero_shot_set("test")
            zs = None if test is None else _or_skip(reporter, "test zero-shot evaluation", zero_shot, exported, test,
                                                     eval_sets.prompts, max_samples=args.eval_max_samples,
                                                     progress=not args.no_progress)
            if zs is not None:
                final["zero_shot"] = zs
                full = final["zero_shot"].pop("full")
                (run_dir / "eval_zero_shot.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
                reporter.record("eval", step=result.steps, split="test", auc_macro=final["zero_shot"]["auc_macro"],
                                auc=final["zero_shot"]["auc"])
            loc = None if eval_sets.synthetic_root is None else _or_skip(
                reporter, "test localisation", localisation, exported, eval_sets.synthetic_root, "test",
                max_samples=args.eval_max_samples, progress=not args.no_progress)
            if loc is not None:
                final["localisation"] = loc
                reporter.record("eval", step=result.steps, split="test",
                                localisation=final["localisation"]["pointing_accuracy"],
                                localisation_chance=final["localisation"]["chance"])
        eval_s = time.perf_counter() - t_eval
        png = plot_metrics(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
        wall = time.perf_counter() - start
        summary = {
            "status": "completed",
            "steps": result.steps,
            "resumed_from_step": start_step if resume is not None else None,
            "wall_time_s": round(wall, 2),
            "setup_s": round(setup_s, 2),
            "train_s": round(result.wall_s, 2),
            "final_eval_s": round(eval_s, 2),
            "samples_per_s": round(result.samples / max(result.wall_s, 1e-9), 2),
            "final_loss": result.last_terms,
            "final_loss_mean_last_steps": result.mean_terms,
            "zero_shot_test": final.get("zero_shot"),
            "localisation_test": final.get("localisation"),
            "validation_history": eval_history,
            "checkpoint": final_ckpt,
            "export": str(export_dir),
            "curves_png": str(png),
            "metrics_jsonl": str(run_dir / "metrics.jsonl"),
            "backends": backends,
            "world_size": world,
            "device": device_type,
            "cpu_count": os.cpu_count(),
            "zero_stage": zero_stage,
            "dtype": str(dtype).replace("torch.", ""),
            "global_batch": global_batch,
            "micro_batch": micro,
            "gradient_accumulation": accum,
            "data": {"source": args.data, "path": data, "n_train": len(train_set),
                     "n_valid": len(eval_sets.valid) if eval_sets.valid is not None else 0,
                     "n_test": len(eval_sets.test) if eval_sets.test is not None else 0},
            "model": model_cfg.to_dict(),
            "parameters": n_params,
            "ds_config": config,
            "args": vars(args),
            "seed": args.seed,
            "versions": versions(),
            "skipped": _skipped_record(skipped, _report_skipped(reporter, "train", train_set, reprobe=True,
                                                               after=len(skipped["train"]))),
        }
        # the export's model card gets the run's data, training and evaluation numbers
        summary["model_card"] = str(write_model_card(export_dir, exported, summary))
        path = reporter.write_summary(summary)
        reporter.log("%s", format_summary(summary, path))
    summary = _rank0(lambda: summary, rank)
    return summary


def _lock_towers(model, args, reporter) -> None:
    """``--lock-image`` / ``--lock-text``: freeze a tower (kept in eval mode; its parameters leave the optimizer).
    Locking a randomly initialised tower is allowed (a frozen random-features baseline) but said in the log."""
    if args.lock_image:
        model.lock_image_tower()
        if args.pretrained is None:
            reporter.warning("--lock-image without --pretrained: the image tower stays at its random initialisation")
    if args.lock_text:
        model.lock_text_tower()
        if model.config.text.source == "random":
            reporter.warning("--lock-text with a randomly initialised report encoder: it stays at its initialisation")
    if args.lock_image or args.lock_text:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        reporter.log("locked %s: %.2fM parameters frozen", " and ".join(
            name for name, on in (("image tower", args.lock_image), ("text tower", args.lock_text)) if on), frozen / 1e6)


def _merge_bad_items(dataset) -> None:
    """Collective: every rank learns the items the other ranks (and their loader workers) found bad."""
    if not hasattr(dataset, "bad_items") or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, dataset.bad_items())
    dataset.mark_bad(sorted({i for items in found for i in items}))


def _report_skipped(reporter, split: str, dataset, reprobe: bool, after: int = 0) -> list:
    """The rows and items of ``dataset`` left out so far (``[{"source", "reason"}]``), each beyond the first
    ``after`` logged to run.log and recorded in metrics.jsonl (rank 0). ``reprobe`` names the reason of items
    flagged in loader workers."""
    items = dataset.skipped(reprobe=reprobe) if dataset is not None and hasattr(dataset, "skipped") else []
    new = items[after:]
    if new:
        reporter.warning("%s split: skipped %d row(s) or item(s) that cannot be used:", split, len(new))
        for item in new:
            reporter.warning("  %s: %s", item["source"], item["reason"])
        reporter.record("event", event="skipped", split=split, items=new)
    return items


def _skipped_record(at_start: dict, train_at_end: list) -> dict:
    """summary.json's ``skipped``: every row and item left out, per split, with reasons."""
    per_split = {**at_start, "train": train_at_end}
    items = [{"split": split, **item} for split, found in per_split.items() for item in found]
    return {"count": len(items), "items": items}


def _or_skip(reporter, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None with a warning when the evaluation data cannot serve it (e.g. a
    split too small to hold both positive and negative images of any class)."""
    try:
        return fn(*args, **kwargs)
    except EvalDataError as e:
        reporter.warning("%s skipped: %s", what, e)
        return None


def format_summary(summary: dict, path) -> str:
    """The end-of-run report printed to the console."""
    lines = ["", "=" * 72, "MLIP training finished", "=" * 72,
             f"steps {summary['steps']}, wall time {summary['wall_time_s']:.1f} s (setup {summary['setup_s']:.1f} s, "
             f"training {summary['train_s']:.1f} s, final evaluation {summary['final_eval_s']:.1f} s), "
             f"{summary['samples_per_s']:.1f} samples/s"]
    loss = summary["final_loss_mean_last_steps"] or summary["final_loss"]
    if loss:
        lines.append("final loss (mean of the last steps): " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    zs = summary.get("zero_shot_test")
    if zs:
        lines.append(f"zero-shot AUC on the test split ({zs['n_images']} images), chance 0.500:")
        for name, auc in zs["auc"].items():
            lines.append(f"  {name:<18} {auc:.3f}" if auc is not None else f"  {name:<18} skipped")
        lines.append(f"  {'macro':<18} {zs['auc_macro']:.3f}   (chance 0.500)")
    loc = summary.get("localisation_test")
    if loc:
        lines.append(f"localisation (pointing accuracy of {loc['n_sentences']} finding sentences): "
                     f"{loc['pointing_accuracy']:.3f}   (chance {loc['chance']:.3f})")
    lines += [f"checkpoint: {summary['checkpoint']}", f"export (from_pretrained): {summary['export']}",
              f"curves: {summary['curves_png']}", f"metrics: {summary['metrics_jsonl']}", f"summary: {path}",
              "=" * 72]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def usage_errors() -> tuple:
    """The exception classes that mean bad usage (arguments, configs, data, checkpoints): exit code 2."""
    return (dsc.DSConfigError, tdata.DataConfigError, ckpt.CheckpointError, ConfigError, DatasetError,
            ModelCheckpointError, PretrainedWeightsError, ImplUnavailableError, LaunchError, RunFolderError)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs :func:`train` and exits the process with the code in the module docstring."""
    code = EXIT_OK
    try:
        train(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
    except TrainingStopped as e:
        print(f"training stopped by {e.reason} after step {e.step}; checkpoint saved at {e.checkpoint}; continue "
              f"with --resume latest", file=sys.stderr)
        code = 128 + e.signum
    except KeyboardInterrupt:  # a second SIGINT / SIGTERM while the first was being handled
        print("training interrupted without a checkpoint (second stop request); the newest complete checkpoint "
              "is intact: continue with --resume latest", file=sys.stderr)
        code = 128 + signal.SIGINT
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_NON_FINITE
    except usage_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except BaseException:  # noqa: BLE001  (any failure must still end the process with a code)
        traceback.print_exc()
        code = EXIT_ERROR
    _exit(code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        try:
            if code == EXIT_OK:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer that already failed: nothing left to synchronise with
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
