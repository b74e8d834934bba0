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

The phases: :mod:`mlip_fast.train.setup` (checks, run folder, seed), :mod:`mlip_fast.train.process` (process
group), :mod:`mlip_fast.train.run` (data, engine, training) and :mod:`mlip_fast.train.finish` (export, final
evaluation, summary).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from typing import Optional, Sequence

import torch

from mlip_fast.data.readers import DatasetError
from mlip_fast.models.config import ConfigError
from mlip_fast.models.factory import CheckpointError as ModelCheckpointError
from mlip_fast.models.vit_weights import PretrainedWeightsError
from mlip_fast.ops.dispatch import ImplUnavailableError
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import data as tdata
from mlip_fast.train import ds_config as dsc
from mlip_fast.train.args import parse_args
from mlip_fast.train.finish import finish
from mlip_fast.train.loop import NonFiniteLossError, TrainingStopped
from mlip_fast.train.process import (LaunchError, deterministic_algorithms, device_type_name, exit_process,
                                     init_distributed)
from mlip_fast.train.reporting import RunReporter
from mlip_fast.train.run import build_engine, fit, prepare_data
from mlip_fast.train.run_folder import RunFolderError
from mlip_fast.train.setup import RunState, claim_run_folder, preflight, resolve_seed

__all__ = ["train", "main", "usage_errors", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NON_FINITE"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NON_FINITE = 0, 1, 2, 3


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

    ranks = init_distributed()
    if "OMP_NUM_THREADS" not in os.environ and device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks.local_world)))
    config = dsc.resolve_batch_sizes(raw_config, ranks.world, where)
    run_dir, resume, lock, stale_lock = claim_run_folder(args, ranks, config.get("zero_optimization", {}).get("stage", 0))
    try:
        args.seed = resolve_seed(args.seed, resume)
        reporter = RunReporter(run_dir, ranks.rank, progress=not args.no_progress)
        try:
            if stale_lock:
                reporter.log("took over the stale run lock of pid %s on %s (that process no longer runs)",
                             stale_lock.get("pid"), stale_lock.get("host"))
            if flag_changes:
                reporter.log("ds config %s with the flags mapped onto it: %s", where, "; ".join(flag_changes))
            run = RunState(args, config, model_cfg, reporter, run_dir, resume, ranks, device_type, start)
            with deterministic_algorithms(args.deterministic):
                return _run(run)
        finally:
            reporter.close()
    finally:
        if lock is not None:
            lock.release()


def _run(run: RunState) -> dict:
    run.reporter.log("run folder: %s (%d process(es), %s)", run.run_dir, run.ranks.world, run.device_type)
    if run.resume is not None:
        run.reporter.log("resuming from %s (step %d)", run.resume, run.resume.step)
        run.reporter.record("event", event="resume", checkpoint=str(run.resume), step=run.resume.step)
    data = prepare_data(run)
    engine = build_engine(run, data)
    done = fit(run, data, engine)
    return finish(run, data, engine, done)


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
    exit_process(code)
