"""The phases of a training run once :mod:`mlip_fast.train.setup` has claimed its folder: the data
(:func:`prepare_data`) and the tokenizer, model, loss and DeepSpeed engine (:func:`build_engine`, which loads the
resumed checkpoint weights-only). :func:`mlip_fast.train.fit.fit` then trains, and
:func:`mlip_fast.train.finish.finish` exports, evaluates and writes the summary. Each phase reads the
:class:`~mlip_fast.train.setup.RunState` and the results of the phases before it.
"""
from __future__ import annotations

import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlip_fast.data.readers import EvalDataError
from mlip_fast.losses import MLIPLoss
from mlip_fast.models import create_model, get_tokenizer
from mlip_fast.models.attention import backend_report
from mlip_fast.models.config import ConfigError, MLIPConfig
from mlip_fast.models.hub import default_preprocess
from mlip_fast.preprocess.tokenization import load_tokenizer
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import data as tdata
from mlip_fast.train import ds_config as dsc
from mlip_fast.train.checkpoint_files import refusal_reason
from mlip_fast.train.compile import CompileState, compile_for_training
from mlip_fast.train.evaluation import EvalSets
from mlip_fast.train.process import barrier, on_rank0
from mlip_fast.train.reporting import with_monitors
from mlip_fast.train.setup import Resume, RunState, total_steps

__all__ = ["RunData", "Engine", "prepare_data", "build_engine", "param_groups", "report_skipped", "or_skip"]


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    """The run's data: the source (``path``: the synthetic benchmark's master.csv or ``--data``), the training
    set with its fingerprint and batch plan, the evaluation sets, what was skipped per split, and the run's
    length in optimizer steps."""

    path: str
    train_set: object
    eval_sets: EvalSets
    skipped: dict
    fingerprint: str
    sampler: object
    total_steps: int


def prepare_data(run: RunState) -> RunData:
    """Reads (or, for ``--data synthetic``, generates once per node into the cache) the data; on a resume,
    checks that it matches the checkpoint's and sets aside what the run wrote after that checkpoint."""
    args, reporter = run.args, run.reporter
    synthetic_root = None
    data = args.data
    if data == "synthetic":
        size = run.model_cfg.vision.image_size
        with run.times.phase("generation"):
            if run.ranks.local_rank == 0:
                tdata.prepare_synthetic(Path(args.cache_dir), size, args.synthetic_n, args.synthetic_seed,
                                        workers=max(1, min(2, os.cpu_count() or 1)), log=reporter.log)
            barrier()
        master = tdata.synthetic_cache_dir(Path(args.cache_dir), size, args.synthetic_n, args.synthetic_seed) / "master.csv"
        data, synthetic_root = str(master), master.parent
    # the preprocessing the export stores (preprocess_config.json) is the one the run trains with
    t_read = time.perf_counter()
    train_tf, eval_tf = default_preprocess(run.model_cfg).transforms()
    kw = dict(image_root=args.image_root, max_bad_fraction=args.max_bad_fraction)
    train_set = tdata.train_subset(tdata.build_pretrain_dataset(data, "train", train_tf, **kw), args.train_fraction,
                                   args.seed)
    if args.in_memory and not hasattr(train_set, "records"):
        raise tdata.DataConfigError(f"--in-memory needs image-report pairs read from an index file; {data} is a shard "
                                    f"folder, which is streamed (drop --in-memory)")
    eval_sets = EvalSets(tdata.build_pretrain_dataset(data, "valid", eval_tf, **kw),
                         tdata.build_pretrain_dataset(data, "test", eval_tf, **kw),
                         "synthetic" if synthetic_root is not None else "chexpert5", synthetic_root)
    reporter.log("data: %s: %d training pairs%s, %s validation, %s test", data, len(train_set),
                 f" (--train-fraction {args.train_fraction:g})" if args.train_fraction < 1.0 else "",
                 len(eval_sets.valid) if eval_sets.valid is not None else "no",
                 len(eval_sets.test) if eval_sets.test is not None else "no")
    splits = {"train": train_set, "valid": eval_sets.valid, "test": eval_sets.test}
    skipped = {split: report_skipped(reporter, split, ds, reprobe=False) for split, ds in splits.items()}
    sampler = tdata.make_batch_plan(train_set, run.micro, run.accum, run.rank, run.ranks.world, args.seed,
                                    args.num_workers, args.shuffle_buffer)
    out = RunData(data, train_set, eval_sets, skipped, tdata.data_fingerprint(train_set), sampler,
                  total_steps(args, sampler.steps_per_epoch))
    run.times.add("datasets", time.perf_counter() - t_read)
    if run.resume is not None:
        _continue_from(run, out)
    return out


def _continue_from(run: RunState, data: RunData) -> None:
    """Refuses a resume whose training data or batch layout differ from the checkpoint's, naming each
    difference (checkpoints that predate a record are not compared on it); when the run continues its own
    checkpoint, sets aside the newer checkpoints and drops the newer metrics records (those steps are redone)."""
    resume: Resume = run.resume
    saved = resume.saved
    now = {"num_train": len(data.train_set), "data_fingerprint": data.fingerprint, "global_batch": run.global_batch,
           "data_order": data.sampler.signature()}
    labels = {"num_train": "training samples", "data_fingerprint": "training data fingerprint",
              "global_batch": "global batch", "data_order": "data order"}
    differ = [f"{labels[k]} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if differ:
        raise ckpt.CheckpointError(f"checkpoint {resume} does not match this run: {'; '.join(differ)}. "
                                   f"Resume with the same data (--data, --image-root), ds config, --num-workers and "
                                   f"--shuffle-buffer, or start a new run")
    if resume.step > data.total_steps:
        raise ckpt.CheckpointError(f"checkpoint is at step {resume.step}, beyond this run's {data.total_steps} steps")
    if run.rank == 0 and Path(resume.root).resolve() == (run.run_dir / ckpt.CHECKPOINT_DIR).resolve():
        for moved in ckpt.set_aside_newer(Path(resume.root), resume.tag):
            run.reporter.log("set aside %s: it is newer than the checkpoint this run resumes from", moved)
        dropped = run.reporter.rewind(resume.step)
        if dropped:
            run.reporter.log("metrics.jsonl: dropped %d record(s) of the steps after %d (they are redone)", dropped,
                             resume.step)


# ---------------------------------------------------------------------------------------------- model
@dataclass
class Engine:
    """The run's tokenizer, model config (as the built model has it), loss, collate function, DeepSpeed engine
    with its resolved config and precision, and the step it starts from."""

    tokenizer: object
    model_cfg: MLIPConfig
    n_params: int
    criterion: MLIPLoss
    collate: object
    engine: object
    config: dict
    dtype: torch.dtype
    start_step: int
    compiled: Optional[CompileState] = None  # --torchcompile: what was compiled (mlip_fast.train.compile)


def build_tokenizer(cfg: MLIPConfig, corpus_fn, run_dir: Path, rank: int, resumed_run: Optional[Path] = None):
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

    return load_tokenizer(on_rank0(build, rank))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices only (not on biases, norms, logit scales), as open_clip."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lock_towers(model, args, reporter) -> None:
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


def build_engine(run: RunState, data: RunData) -> Engine:
    """Tokenizer, model (identical initial weights on every rank), loss, collate and the DeepSpeed engine with
    the schedule of the run's length; loads the resumed checkpoint."""
    args, reporter = run.args, run.reporter
    with run.times.phase("vocabulary"):
        tokenizer = build_tokenizer(run.model_cfg, lambda: tdata.report_corpus(data.train_set), run.run_dir,
                                    run.rank, run.resume.run_dir if run.resume is not None else None)
    t_model = time.perf_counter()
    torch.manual_seed(args.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)
    try:
        model = create_model(run.model_cfg, tokenizer=tokenizer, image_pretrained=args.pretrained)
    except pickle.UnpicklingError as err:  # read weights-only: nothing of the file was run
        unsafe, reason = refusal_reason(err)
        sources = ", ".join(f"{what} {where}" for what, where in (("--pretrained", args.pretrained),
                                                                 ("text tower", run.model_cfg.text.name)) if where)
        raise ConfigError(f"a weights file of the model ({sources}) was refused: "
                          f"{'it asks to run ' + reason if unsafe else 'not a file of tensors (' + reason + ')'}; "
                          f"weights are loaded as data only, never as code") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    lock_towers(model, args, reporter)
    model_cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    criterion = MLIPLoss(lambda_local=args.lambda_local, lambda_sie=args.lambda_sie,
                         lambda_within=args.lambda_within, sie_temperature=args.sie_temperature,
                         sie_mode=model_cfg.sie_mode, impl=args.impl, deterministic=args.deterministic,
                         local_matching=model_cfg.local_matching,
                         ot_eps=model_cfg.ot_eps, ot_iters=model_cfg.ot_iters)
    if args.deterministic:
        reporter.log("deterministic: torch deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=%s, patch-sentence backward "
                     "without atomics, ViT attention %s, text attention %s", os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     model_cfg.vision.attn_backend, model_cfg.text.attn_implementation)
    collate = tdata.make_collator(tokenizer, model_cfg.text.max_length, model_cfg.text.max_sentences)
    compiled = compile_for_training(model, criterion, args.torchcompile_backend,
                                    run.ranks.world) if args.torchcompile else None
    if compiled is not None:  # in place, before the engine wraps the model: state_dict keys unchanged
        reporter.log("torch.compile (%s): %s; compiled at the first step", compiled.backend, ", ".join(compiled.compiled))
        if run.zero_stage == 3:  # measured on mlip-tiny (aot_eager): 50 graphs instead of 7, 8x the compile time
            reporter.warning("--torchcompile under ZeRO-3: the parameter gathers inside the towers split the compiled "
                             "graphs into many pieces (long compile, little to gain); ZeRO-1/2 compile whole towers")

    config = dsc.resolve_schedule(run.config, data.total_steps)
    if args.lr is not None:
        config["optimizer"]["params"]["lr"] = args.lr
    config = with_monitors(config, args.report_to, run.run_dir)
    weight_decay = config["optimizer"]["params"].get("weight_decay", 0.0)
    import deepspeed  # the training app's engine: imported when a run builds it, not for --help or usage errors

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           config=config)
    dtype = dsc.precision_dtype(config)
    start_step = 0
    if run.resume is not None:
        start_step = int(ckpt.load_checkpoint(engine, Path(run.resume.root), run.resume.tag)["step"])
    data.sampler.start_step = start_step
    run.times.add("model_and_engine", time.perf_counter() - t_model)
    v = model_cfg.vision
    reporter.log("model %s: %.2fM parameters; image %d px, %d patches, mask ratio %.2f, integrity mode %s (warm-up %d "
                 "steps); text %s", model_cfg.name, n_params / 1e6, v.image_size, v.num_patches, model_cfg.mask_ratio,
                 model_cfg.sie_mode, model_cfg.sie_warmup, model_cfg.text.source)
    reporter.log("DeepSpeed: ZeRO stage %d, %s, global batch %d = micro %d x accumulation %d x %d process(es), "
                 "%d steps (%.1f epochs of %d steps), peak lr %g", run.zero_stage, str(dtype).replace("torch.", ""),
                 run.global_batch, run.micro, run.accum, run.ranks.world, data.total_steps,
                 data.total_steps / data.sampler.steps_per_epoch, data.sampler.steps_per_epoch,
                 config["optimizer"]["params"]["lr"])
    reporter.log("ViT attention backends on %s: %s", run.device_type, backend_report(run.device_type, dtype))
    return Engine(tokenizer, model_cfg, n_params, criterion, collate, engine, config, dtype, start_step, compiled)


# ---------------------------------------------------------------------------------------------- helpers
def report_skipped(reporter, split: str, dataset, reprobe: bool, after: int = 0) -> list:
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


def or_skip(reporter, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None with a warning when the evaluation data cannot serve it (e.g. a
    split too small to hold both positive and negative images of any class)."""
    try:
        return fn(*args, **kwargs)
    except EvalDataError as e:
        reporter.warning("%s skipped: %s", what, e)
        return None
