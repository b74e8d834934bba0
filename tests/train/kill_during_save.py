"""Kill -9 at random points while a run saves checkpoints, then resume: the helper behind
``tests/train/test_reliability.py::test_kill_9_during_saves_always_resumes``.

``python -m tests.train.kill_during_save RUN_DIR ATTEMPTS SEED`` prints one JSON line (below).

The process imports torch, DeepSpeed and the model once, then forks one saver per attempt (a fork costs
0.2 s where a fresh interpreter costs 7 s). A saver is a world of one that does what a resumed run does
with the app's own code (``resolve_resume``, ``verify_checkpoint``, ``load_checkpoint``,
``set_aside_newer``, ``Checkpointer``): it resumes from ``latest`` (scenario ``continue``), from
``latest`` of a finished run whose last step is saved again (``finished``), or from the older of the two
kept checkpoints (``rewind``), then saves step after step until it is killed. Kill times are random: a
quarter of the attempts die at a uniform time in the first 0.3 s after the fork (start-up, resume, setting
newer checkpoints aside), the others at a uniform time in the 0.3 s after the saver reports it is ready
(saving). After each kill another forked process resumes ``--resume latest`` exactly as the app does and
reports the step it loaded.

Per attempt: ``begun`` = highest step whose save had started (the training progress when killed),
``done`` = highest step whose save had returned, ``resumed`` = the loaded step. A resume succeeds when it
loads without error, loses no completed save (``resumed >= done``) and loses at most one save interval
(``begun - resumed <= 1``; every step is saved here).

Output: ``{"attempts", "successful_resumes", "max_steps_lost", "killed_while_saving", "killed_before_ready",
"records": [...]}``.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch

from mlip_fast.models import create_model, get_model_config, get_tokenizer
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train.checkpoint_save import Checkpointer
from mlip_fast.train.process import init_distributed
from mlip_fast.train.run import param_groups

DS_CONFIG = {
    "train_batch_size": 8,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000000,
}
SCENARIOS = ("continue", "finished", "rewind")
KEEP = 2
WINDOW_S = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(tokenizer):
    os.environ["MASTER_PORT"] = str(_free_port())
    init_distributed()
    model = create_model(get_model_config("mlip-tiny"), tokenizer=tokenizer)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=DS_CONFIG)
    return engine


def _client(step: int) -> dict:
    return dict(step=step, epoch=0, step_in_epoch=step, world_size=1, zero_stage=2, global_batch=8, num_train=8, seed=0)


def _say(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())  # unbuffered: a line written before the kill is never lost


def _saver(run_dir: Path, scenario: str, rewind_tag, tokenizer, fd: int) -> None:
    engine = _engine(tokenizer)
    root = run_dir / ckpt.CHECKPOINT_DIR
    step, resumed = 0, None
    if (root / ckpt.LATEST).is_file():
        if scenario == "rewind" and rewind_tag is not None:
            tag = rewind_tag
        else:
            _, tag = ckpt.resolve_resume("latest", run_dir, run_dir.parent)
        ckpt.verify_checkpoint(root, tag, world_size=1, zero_stage=2)
        step = int(ckpt.load_checkpoint(engine, root, tag)["step"])
        resumed = (root, tag)
        ckpt.set_aside_newer(root, tag)  # as the app does on every resume into the checkpoint's own folder
    checkpointer = Checkpointer(root, keep=KEEP, resumed=resumed)
    if scenario == "finished":  # the final save of a run resumed after it had finished
        checkpointer.save(engine, step, _client(step))
    _say(fd, f"ready {step}")
    while True:
        step += 1
        _say(fd, f"begin {step}")
        with torch.no_grad():  # a different state in every checkpoint
            next(engine.module.parameters()).add_(1.0)
        checkpointer.save(engine, step, _client(step))
        _say(fd, f"done {step}")


def _verifier(run_dir: Path, tokenizer, fd: int) -> None:
    try:
        engine = _engine(tokenizer)
        root, tag = ckpt.resolve_resume("latest", run_dir, run_dir.parent)
        ckpt.verify_checkpoint(root, tag, world_size=1, zero_stage=2)
        state = ckpt.load_checkpoint(engine, root, tag)
        Checkpointer(root, keep=KEEP)  # a resumed run clears the leftovers of the killed one
        _say(fd, json.dumps({"ok": True, "step": int(state["step"]), "tag": tag}))
    except Exception as e:  # reported to the parent, which counts it as a failed resume
        _say(fd, json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))


def _fork(target, *args) -> tuple:
    """(pid, read fd) of a child running ``target(*args, write_fd)``; the child never returns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            target(*args, w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _read_lines(fd: int, until: str | None = None, timeout: float = 60.0) -> list:
    """Lines from a child's pipe: up to one starting with ``until``, else until EOF."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if until is not None and any(line.startswith(until) for line in data.decode().splitlines()):
            break
    return data.decode().splitlines()


def _steps(lines: list, word: str) -> list:
    return [int(line.split()[1]) for line in lines if line.startswith(word + " ")]


def main(run_dir: str, attempts: int, seed: int) -> dict:
    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    rng = random.Random(seed)
    tokenizer = get_tokenizer("mlip-tiny", corpus=["The heart is normal. No pleural effusion."] * 20)
    _engine(tokenizer)  # imports and initialises everything once, so that forked children start fast
    deepspeed.comm.destroy_process_group()
    pid, fd = _fork(_saver, run_dir, "continue", None, tokenizer)  # two checkpoints to start from
    _read_lines(fd, until="done 2")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    records = []
    for attempt in range(attempts):
        root = run_dir / ckpt.CHECKPOINT_DIR
        kept = sorted(s for s in (ckpt.step_of(p.name) for p in root.iterdir() if p.is_dir()) if s is not None)
        scenario = SCENARIOS[attempt % len(SCENARIOS)]
        rewind_tag = ckpt.tag_for(kept[-2]) if scenario == "rewind" and len(kept) >= 2 else None
        latest = ckpt.step_of((root / ckpt.LATEST).read_text().strip())
        baseline = ckpt.step_of(rewind_tag) if rewind_tag is not None else latest
        early = attempt % 4 == 0
        pid, fd = _fork(_saver, run_dir, scenario, rewind_tag, tokenizer)
        lines = [] if early else _read_lines(fd, until="ready")
        time.sleep(rng.uniform(0.0, WINDOW_S))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lines += _read_lines(fd)
        os.close(fd)
        vpid, vfd = _fork(_verifier, run_dir, tokenizer)
        result = json.loads(_read_lines(vfd)[-1])
        os.waitpid(vpid, 0)
        os.close(vfd)
        begun = max(_steps(lines, "begin") + [baseline])
        done = max(_steps(lines, "done") + [baseline])
        resumed = result.get("step")
        lost = None if resumed is None else max(0, begun - resumed)
        ok = bool(result["ok"]) and resumed >= done and lost <= 1
        phase = "saving" if lines and lines[-1].startswith("begin") else "before ready" if not any(
            line.startswith("ready") for line in lines) else "between saves"
        records.append({"attempt": attempt, "scenario": scenario, "phase": phase, "begun": begun, "done": done,
                        "resumed": resumed, "steps_lost": lost, "ok": ok, "error": result.get("error")})
    return {"attempts": len(records), "successful_resumes": sum(r["ok"] for r in records),
            "max_steps_lost": max((r["steps_lost"] or 0) for r in records),
            "killed_while_saving": sum(r["phase"] == "saving" for r in records),
            "killed_before_ready": sum(r["phase"] == "before ready" for r in records), "records": records}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
    sys.stdout.flush()
    os._exit(0)
