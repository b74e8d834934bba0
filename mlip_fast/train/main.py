"""Entry point of the training app: ``deepspeed train.py --deepspeed_config ds.json [options]``.

:func:`train` does the work and returns the run summary (tests call it in-process); :func:`main` wraps it
with exit codes and a clean process exit:

====  ======================================================================================
0     success (summary.json written)
1     unexpected error (traceback printed)
2     bad usage or bad input: arguments, DeepSpeed config, model config, data (also when it fails
      mid-run: the steps trained are checkpointed first), a checkpoint that is corrupt, unsafe or
      incompatible, a full disk (message printed, one line)
3     non-finite loss, gradients or weights: stopped without saving that state; ``latest`` still
      names the last good checkpoint
130   stopped by SIGINT, 143 by SIGTERM (or by the DeepSpeed launcher ending): during training a
      checkpoint was saved first (``--resume latest``), during start-up the run ended at once; also
      130 when a second stop interrupted without a checkpoint
====  ======================================================================================

The phases: :mod:`mlip_fast.train.setup` (checks, run folder, seed), :mod:`mlip_fast.train.process` (process
group), :mod:`mlip_fast.train.run` (data, engine), :mod:`mlip_fast.train.fit` (training) and
:mod:`mlip_fast.train.finish` (export, final evaluation, summary). The stop handling
(:mod:`mlip_fast.train.signals`) is installed before all of them.
"""
from __future__ import annotations

import errno
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
from mlip_fast.train.fit import fit
from mlip_fast.train.run import build_engine, prepare_data
from mlip_fast.train.run_folder import RunFolderError
from mlip_fast.train.setup import RunState, claim_run_folder, preflight, resolve_seed
from mlip_fast.train.signals import StopRequest, StopSignal, watch_launcher

__all__ = ["train", "main", "usage_errors", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NON_FINITE"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NON_FINITE = 0, 1, 2, 3


def train(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs one training job (see the module docstring) and returns its summary dict."""
    start = time.perf_counter()
    args = parse_args(argv)
    # Before anything slow (process group, data, a resume load): a stop during start-up ends the run at once,
    # whichever launcher form started it.
    stop = StopRequest(immediate=True).install()
    watch = watch_launcher(stop)
    where = {"phase": "start-up", "step": None, "checkpoint": None}  # what a stop message reports
    try:
        return _train(args, stop, start, where)
    except StopSignal as e:
        raise TrainingStopped(e.signum, where["step"], where["checkpoint"], e.reason, phase=where["phase"]) from None
    finally:
        watch.close()
        stop.uninstall()


def _train(args, stop: StopRequest, start: float, where: dict) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.deterministic:  # read when cuBLAS starts: before anything touches CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device_type = device_type_name()
    raw_config, model_cfg, flag_changes = preflight(args, device_type)  # before any process group exists
    config_path = str(dsc.resolve_ds_config(args.deepspeed_config))

    ranks = init_distributed()
    if "OMP_NUM_THREADS" not in os.environ and device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks.local_world)))
    config = dsc.resolve_batch_sizes(raw_config, ranks.world, config_path)
    claim = claim_run_folder(args, ranks, config.get("zero_optimization", {}).get("stage", 0))
    if claim.resume is not None:
        where.update(step=claim.resume.step, checkpoint=str(claim.resume))
    try:
        args.seed = resolve_seed(args.seed, claim.resume)
        reporter = RunReporter(claim.run_dir, ranks.rank, progress=not args.no_progress)
        run = None
        try:
            _report_claim(reporter, claim)
            if flag_changes:
                reporter.log("ds config %s with the flags mapped onto it: %s", config_path, "; ".join(flag_changes))
            run = RunState(args, config, model_cfg, reporter, claim.run_dir, claim.resume, ranks, device_type, start,
                           stop=stop)
            with deterministic_algorithms(args.deterministic):
                return _run(run)
        except StopSignal as e:
            if run is not None:
                where.update(phase=run.phase, step=where["step"] if run.step is None else run.step,
                             checkpoint=run.checkpoint or where["checkpoint"])
            reporter.record("event", event="stopped", signal=e.signum, reason=e.reason, phase=where["phase"],
                            step=where["step"], checkpoint=where["checkpoint"])
            raise
        finally:
            reporter.close()
    finally:
        if claim.lock is not None:
            claim.lock.release()


def _report_claim(reporter: RunReporter, claim) -> None:
    """Logs what the claim decided that the user must hear of (rank 0): a stale lock taken over, checkpoints
    rejected on resume (and the one used instead), a run restarted from scratch."""
    if claim.stale_lock:
        reporter.log("took over the stale run lock of pid %s on %s (that process no longer runs)",
                     claim.stale_lock.get("pid"), claim.stale_lock.get("host"))
    for reason in claim.rejected:
        reporter.warning("checkpoint rejected: %s", reason)
        reporter.record("event", event="checkpoint_rejected", reason=reason)
    if claim.rejected and claim.resume is not None:
        reporter.warning("resuming from the newest checkpoint that verifies instead: %s", claim.resume)
    if claim.restart:
        reporter.warning("--resume latest: %s has no checkpoint (its run stopped before the first one); starting "
                         "that run again from scratch", claim.run_dir)
        dropped = reporter.rewind(0)
        reporter.record("event", event="restart", dropped_records=dropped)


def _run(run: RunState) -> dict:
    run.reporter.log("run folder: %s (%d process(es), %s)", run.run_dir, run.ranks.world, run.device_type)
    if run.resume is not None:
        run.reporter.log("resuming from %s (step %d)", run.resume, run.resume.step)
        run.reporter.record("event", event="resume", checkpoint=str(run.resume), step=run.resume.step)
    run.times.add("start_up", run.elapsed())
    data = prepare_data(run)
    engine = build_engine(run, data)
    done = fit(run, data, engine)
    return finish(run, data, engine, done)


def _stopped_message(e: TrainingStopped) -> str:
    if e.phase == "start-up":
        kept = f"; the checkpoint it was resuming from ({e.checkpoint}) is unchanged" if e.checkpoint else ""
        return (f"training stopped by {e.reason} during start-up, before its first step{kept}; run the command "
                f"again to start (with --resume latest to continue the folder's run)")
    if e.phase == "finish":
        return (f"training stopped by {e.reason} after its last step ({e.step}, checkpoint {e.checkpoint}), during "
                f"the export and final evaluation; --resume latest writes them")
    return (f"training stopped by {e.reason} after step {e.step}; checkpoint saved at {e.checkpoint}; continue "
            f"with --resume latest")


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
        print(_stopped_message(e), file=sys.stderr)
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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            traceback.print_exc()
            code = EXIT_ERROR
        else:
            print(f"error: no space left on device writing {e.filename or 'the run folder'} ({e.strerror}); free "
                  f"space, then continue with --resume latest", file=sys.stderr)
            code = EXIT_USAGE
    except BaseException:  # noqa: BLE001  (any failure must still end the process with a code)
        traceback.print_exc()
        code = EXIT_ERROR
    exit_process(code)
