"""Nothing lost, nothing clobbered: stop signals through the DeepSpeed launcher, kill -9 during checkpoint
saves, one run per folder, resume checks, and bad report rows, each run at small size."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from mlip_fast.data.readers import DatasetError
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train.checkpoint_save import Checkpointer
from mlip_fast.train.main import train
from mlip_fast.train.reporting import read_metrics
from mlip_fast.train.run_folder import LOCK_NAME, RunFolderError, RunLock
from mlip_fast.train.signals import ECHO_WINDOW_S, LauncherWatch, StopRequest, launcher_chain
from tests.train.conftest import REPO, TRAIN_PY, base_args, clean_env, seed_run_dir, train_records, write_ds
from tests.process_group import free_port

pytestmark = pytest.mark.slow

DEEPSPEED = str(REPO / ".venv" / "bin" / "deepspeed") if (REPO / ".venv" / "bin" / "deepspeed").exists() else "deepspeed"
KILL_ATTEMPTS = 20


def _records(run_dir) -> list:
    """The records of a run's metrics.jsonl (a line being written is skipped)."""
    return read_metrics(run_dir / "metrics.jsonl")


def _wait_for_a_step(proc, run_dir, after: int = 0, timeout: float = 240) -> int:
    """Waits until metrics.jsonl has a train record past step ``after``; returns that step."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be signalled"
        steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"] if metrics.is_file() else []
        if steps and max(steps) > after:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError("no training step within the time limit")


def _launch(cmd, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)


def _end_all(procs, timeout: float) -> list:
    """Waits for ``procs`` to end; kills and returns the ones still alive after ``timeout``."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    return alive


# ------------------------------------------------------------------------------------------- signals
def test_sigterm_to_the_deepspeed_command_stops_every_rank_with_a_checkpoint(tmp_path, synthetic_cache):
    """``kill <pid of deepspeed>`` (2 ranks): DeepSpeed's runner ends at once, the ranks notice, finish the
    step, save one checkpoint together and exit 143, and the launcher follows with that code."""
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN_PY),
           *base_args(ds, run_dir, synthetic_cache, "--steps", "100000", "--no-final-eval", "--num-workers", "1")]
    proc = _launch(cmd, tmp_path / "out.log")
    tree = []
    try:
        _wait_for_a_step(proc, run_dir)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        alive = _end_all(tree, timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        _end_all(tree, timeout=0)
    assert not alive, "launcher or ranks still running after the deepspeed command was stopped"
    out = (tmp_path / "out.log").read_text()
    reason = f"the deepspeed command (pid {proc.pid}) exiting"
    assert out.count(f"training stopped by {reason} after step") == 2, out[-3000:]  # each rank
    assert "exits with return code = 143" in out
    root = run_dir / "checkpoints"
    state = ckpt.verify_checkpoint(root, (root / "latest").read_text().strip(), world_size=2, zero_stage=2)
    assert max(train_records(run_dir)) == state["step"]
    stopped = [r for r in _records(run_dir) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == reason and stopped[0]["signal"] == signal.SIGTERM
    assert stopped[0]["step"] == state["step"]


MLIP_TRAIN = REPO / ".venv" / "bin" / "mlip-train"
# The three ways to start a run through DeepSpeed's launcher (the rank's command line, and whether DeepSpeed's
# runner is the ``deepspeed`` command or runs inside ``mlip-train``, differ between them).
LAUNCHER_FORMS = {
    "deepspeed train.py": lambda port: [DEEPSPEED, "--master_port", port, str(TRAIN_PY)],
    "deepspeed --module": lambda port: [DEEPSPEED, "--master_port", port, "--module", "mlip_fast.train"],
    "mlip-train": lambda port: ([str(MLIP_TRAIN)] if MLIP_TRAIN.exists() else [sys.executable, "-m", "mlip_fast.train.launch"])
    + ["--master_port", port],
}


def _wait_for_log(proc, run_log, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command ended (exit {proc.returncode}) before it could be signalled"
        if run_log.is_file() and text in run_log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {run_log} within the time limit")


def test_a_stop_during_start_up_ends_every_process_of_each_launcher_form(tmp_path):
    """SIGTERM to the command while the rank is still building its data (a fresh synthetic benchmark being
    generated), for each launcher form at once: every process of the job (runner, launcher, rank, the generator's
    workers) ends, the run records the stop, and nothing is recorded as completed. Before, the launcher and the
    rank ran on under pid 1 to the end, and SIGTERM to mlip-train was never seen by the rank."""
    ds = write_ds(tmp_path / "ds.json")
    jobs = {}
    try:
        for k, (form, command) in enumerate(LAUNCHER_FORMS.items()):
            run_dir, cache = tmp_path / f"run{k}", tmp_path / f"cache{k}"
            cmd = [*command(str(free_port())), *base_args(ds, run_dir, cache, "--synthetic-n", "3000", "--steps", "5",
                                                            "--no-final-eval")]
            jobs[form] = (_launch(cmd, tmp_path / f"out{k}.log"), run_dir, tmp_path / f"out{k}.log")
        trees = {}
        for form, (proc, run_dir, _) in jobs.items():
            _wait_for_log(proc, run_dir / "run.log", "synthetic benchmark: generating")
            trees[form] = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
        for form, (proc, run_dir, out) in jobs.items():
            proc.wait(timeout=60)
            alive = _end_all(trees[form], timeout=90)
            assert not alive, (form, [p.pid for p in alive], out.read_text()[-2000:])
            text = out.read_text()
            assert "during start-up, before its first step" in text and "Traceback" not in text, (form, text[-3000:])
            stopped = [r for r in _records(run_dir) if r.get("event") == "stopped"]
            assert len(stopped) == 1 and stopped[0]["phase"] == "start-up", (form, stopped)
            assert not any(r["kind"] == "train" for r in _records(run_dir)) and not (run_dir / "summary.json").exists()
    finally:
        for proc, _, _ in jobs.values():
            if proc.poll() is None:
                proc.kill()


def test_a_second_stop_interrupts_at_once(tmp_path, synthetic_cache):
    """SIGTERM while the run is in a long optimizer step (3 micro-steps at 256 px), then SIGTERM again more
    than ECHO_WINDOW_S later: the second interrupts at once (KeyboardInterrupt: exit 130), no checkpoint of
    the step in progress is written, and the run folder's lock is released."""
    ds = write_ds(tmp_path / "ds.json", train_batch_size=24, train_micro_batch_size_per_gpu=8,
                  gradient_accumulation_steps=3)
    run_dir = tmp_path / "run"
    sent = []

    def signal_twice():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(r["kind"] == "train" for r in _records(run_dir)):
                break  # a step has just ended: the next one takes seconds
            time.sleep(0.02)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(time.monotonic())
            time.sleep(ECHO_WINDOW_S + 0.3)

    thread = threading.Thread(target=signal_twice, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt, match="second stop request"):
        train(base_args(ds, run_dir, synthetic_cache, "--image-size", "256", "--steps", "30", "--save-every", "0",
                        "--no-final-eval"))
    thread.join()
    assert len(sent) == 2
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert not any(r.get("event") == "stopped" for r in _records(run_dir))
    assert not (run_dir / LOCK_NAME).exists()


def test_stop_request_takes_copies_within_the_echo_window_as_one():
    """A terminal's Ctrl-C plus the launcher's forwarded SIGTERM are one request; a signal after
    ECHO_WINDOW_S interrupts; a watcher request never interrupts by itself."""
    now = [100.0]
    stop = StopRequest(clock=lambda: now[0]).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        now[0] += 0.01
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwarding the same Ctrl-C
        stop.request(signal.SIGTERM, "the deepspeed command (pid 1) exiting")
        assert (stop.signum, stop.reason) == (signal.SIGINT, "SIGINT")
        now[0] += ECHO_WINDOW_S
        with pytest.raises(KeyboardInterrupt, match="second stop request"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in the main thread at the next bytecode
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_launcher_watch_requests_a_stop_when_the_launcher_ends():
    assert launcher_chain() == []  # pytest is not started by deepspeed.launcher.launch
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop = StopRequest()
    watch = LauncherWatch(stop, [("deepspeed launcher", psutil.Process(launcher.pid))], poll_s=0.05)
    try:
        time.sleep(0.3)
        assert stop.signum is None
        launcher.kill()
        deadline = time.monotonic() + 30
        while stop.signum is None and time.monotonic() < deadline:  # seen even as an unreaped zombie
            time.sleep(0.05)
        assert stop.signum == signal.SIGTERM and stop.reason == f"the deepspeed launcher (pid {launcher.pid}) exiting"
    finally:
        watch.close()
        launcher.kill()
        launcher.wait()


# ------------------------------------------------------------------------------------------- kill -9
def test_kill_9_during_saves_always_resumes(tmp_path):
    """20 kill -9 at random points while checkpoints are saved (including the final save of a resumed
    finished run and a resume from an older checkpoint): ``--resume latest`` always loads, no completed save
    is lost, and at most one save interval is (see tests/train/kill_during_save.py)."""
    proc = subprocess.run([sys.executable, "-m", "tests.train.kill_during_save", str(tmp_path / "run"),
                           str(KILL_ATTEMPTS), "17"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in result.items() if k != "records"})
    failed = [r for r in result["records"] if not r["ok"]]
    assert result["attempts"] == KILL_ATTEMPTS and not failed, failed
    assert result["successful_resumes"] == KILL_ATTEMPTS and result["max_steps_lost"] <= 1
    assert result["killed_while_saving"] >= KILL_ATTEMPTS // 2  # the kills did land inside saves
    assert {r["scenario"] for r in result["records"]} == {"continue", "finished", "rewind"}


@pytest.mark.parametrize("crash", ["file half-written", "folder renamed, latest not replaced", "latest half-written",
                                   "pruning half-done"])
def test_every_crash_point_of_a_save_leaves_latest_complete(finished, tmp_path, crash):
    """The disk as a kill leaves it at each point of the save of step 6 after step 4 (a half-written file is
    the moment an in-place rewrite used to leave latest naming a truncated file): ``--resume latest`` finds
    step 4 complete, the resumed run sets an orphan step 6 aside, and the leftovers are removed."""
    run_dir, _ = finished
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    step4 = root / "step00000004"
    if crash == "file half-written":
        staged = root / ".partial-step00000006" / "step00000006"
        staged.mkdir(parents=True)
        data = (step4 / "mp_rank_00_model_states.pt").read_bytes()
        (staged / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 3])
    elif crash == "folder renamed, latest not replaced":
        shutil.copytree(step4, root / "step00000006")
    elif crash == "latest half-written":
        shutil.copytree(step4, root / "step00000006")
        (root / ".latest.tmp-12345").write_text("step000")
    else:
        shutil.copytree(root / "step00000002", root / ".discard-step00000002-12345")
        (root / ".discard-step00000002-12345" / "mp_rank_00_model_states.pt").unlink()
    found_root, tag = ckpt.resolve_resume("latest", tmp_path, tmp_path)
    assert (found_root, tag) == (root, "step00000004")
    assert ckpt.verify_checkpoint(root, tag, world_size=1, zero_stage=2)["step"] == 4
    moved = ckpt.set_aside_newer(root, tag)
    Checkpointer(root, keep=2, resumed=(root, tag))
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if n.startswith(".")]
    assert [n for n in names if ckpt.step_of(n) is not None] == ["step00000002", "step00000004"]
    assert [p.name.split(".")[0] for p in moved] == (["step00000006"] if "renamed" in crash or "latest" in crash else [])


# ------------------------------------------------------------------------------------ one run per folder
def test_two_runs_started_together_in_one_folder(tmp_path, synthetic_cache, shared_tokenizer):
    """Exactly one trains; the other stops with exit 2 and one line naming the holder, leaves nothing
    behind, and the folder's records have each step once."""
    ds = write_ds(tmp_path / "ds.json")
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    cmd = [sys.executable, str(TRAIN_PY), *base_args(ds, run_dir, synthetic_cache, "--steps", "10", "--no-final-eval")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    message = outs[loser][1].strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in outs[loser][1]
    assert (f"in use by another run (pid {procs[winner].pid} on host {socket.gethostname()}" in message
            or "already holds a run" in message), message
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "train"] == list(range(1, 11))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
    assert sorted(p.name for p in run_dir.iterdir() if "tmp" in p.name or p.name == LOCK_NAME) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_cache):
    """A finished 4-step run with checkpoints at steps 2 and 4 (all kept), seed 3."""
    tmp = tmp_path_factory.mktemp("finished")
    ds = write_ds(tmp / "ds.json")
    run_dir = tmp / "run"
    train(base_args(ds, run_dir, synthetic_cache, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "0",
                    "--no-final-eval", "--seed", "3"))
    return run_dir, ds


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_refused_without_resume(finished, tmp_path, synthetic_cache):
    run_dir, ds = finished
    before = _snapshot(run_dir)
    with pytest.raises(RunFolderError, match=r"already holds a run \(metrics.jsonl, checkpoints, summary.json, "
                                             r"export\); continue it with --resume latest"):
        train(base_args(ds, run_dir, synthetic_cache, "--steps", "4"))
    assert _snapshot(run_dir) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("notes")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        train(base_args(ds, a_file, synthetic_cache, "--steps", "2"))
    assert a_file.read_text() == "notes"


def test_resuming_a_finished_run_rewrites_no_checkpoint_and_no_record(finished, synthetic_cache):
    """The checkpoint of the last step is the state the resumed run holds: it is not written again (this is
    where a kill used to leave a 0-byte file behind ``latest``), and the finished run's records (summary.json,
    export, model card, curves) are kept as they are (they used to be rewritten with 0.0 s of training and an
    empty final loss)."""
    run_dir, ds = finished
    logs = ("metrics.jsonl", "run.log")  # the resume's own lines are appended there
    before = {k: v for k, v in _snapshot(run_dir).items() if k not in logs}
    recorded = json.loads((run_dir / "summary.json").read_text())
    summary = train(base_args(ds, run_dir, synthetic_cache, "--steps", "4", "--save-every", "2",
                              "--keep-checkpoints", "0", "--no-final-eval", "--resume", "latest"))
    assert summary == recorded and summary["steps"] == 4 and summary["seed"] == 3
    assert {k: v for k, v in _snapshot(run_dir).items() if k not in logs} == before
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert "had already finished (step 4): its records are kept as they are" in (run_dir / "run.log").read_text()


def test_resume_must_match_the_recorded_seed_and_data(finished, tmp_path, synthetic_cache):
    run_dir, ds = finished
    before = _snapshot(run_dir)
    with pytest.raises(ckpt.CheckpointError, match=r"was trained with --seed 3; this run asks for --seed 5. "
                                                   r"Resume with --seed 3 \(or leave --seed out\)"):
        train(base_args(ds, run_dir, synthetic_cache, "--steps", "6", "--resume", "latest", "--seed", "5"))
    other = tmp_path / "other-data"
    with pytest.raises(ckpt.CheckpointError, match=r"does not match this run: training samples 38 -> 51; "
                                                   r"training data fingerprint [0-9a-f]{16} -> [0-9a-f]{16}"):
        train(base_args(ds, other, synthetic_cache, "--steps", "6", "--resume", str(run_dir / "checkpoints"),
                        "--synthetic-n", "64"))
    assert _snapshot(run_dir) == before and not (other / "checkpoints").exists()


def test_resume_from_an_older_checkpoint_redoes_later_steps_once(finished, tmp_path, synthetic_cache):
    """A run continued from its step-2 checkpoint (as after a kill between saves): metrics.jsonl keeps each
    step once, and the newer checkpoint is set aside, not overwritten."""
    src, ds = finished
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    old_step4 = _snapshot(run_dir / "checkpoints" / "step00000004")
    train(base_args(ds, run_dir, synthetic_cache, "--steps", "5", "--save-every", "2", "--keep-checkpoints", "0",
                    "--no-final-eval", "--resume", str(run_dir / "checkpoints" / "step00000002")))
    steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step00000004.superseded-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == old_step4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000005"


def test_run_lock_stale_live_and_foreign_holders(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"), str(folder / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "then"}))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {holder.pid} on host"):
            RunLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(folder).acquire()  # the holder died: its lock is stale and taken over
    assert lock.stale["pid"] == holder.pid
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_NAME).exists()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-node", "since": "then"}))
    with pytest.raises(RunFolderError, match=rf"locked by a run on another host .*delete {folder / LOCK_NAME}"):
        RunLock(folder).acquire()


# ------------------------------------------------------------------------------------- bad report rows
def _manifest(folder, rows):
    """A CSV manifest of 32 px PNGs; ``rows`` are (image name, report bytes); images named 'missing*' are
    not written."""
    (folder / "img").mkdir(parents=True)
    lines = [b"image,report\n"]
    for k, (name, report) in enumerate(rows):
        if not name.startswith("missing"):
            pixels = np.random.default_rng(k).integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "img" / name)
        lines.append(f"img/{name},\"".encode() + report + b"\"\n")
    (folder / "pairs.csv").write_bytes(b"".join(lines))
    return folder / "pairs.csv"


def test_bad_report_rows_are_skipped_and_named_in_the_run_records(tmp_path):
    """A row with a byte that is not UTF-8, a punctuation-only report, a 200,000-character report and a
    missing image among 98 rows: the run trains (a full epoch reads every row), and run.log, metrics.jsonl and summary.json name every
    skipped row with its reason; over the limit the run stops before training, naming them all."""
    rows = [(f"{k}.png", f"Heart size normal {k}. No effusion.".encode()) for k in range(98)]  # 96 kept: 12 batches
    rows[7] = ("7.png", b"Caf\xe9 au lait.")
    rows[20] = ("20.png", b"- .")
    rows[30] = ("30.png", b"Heart size is normal. " * 9091)
    rows[40] = ("missing40.png", b"Clear lungs.")
    manifest = _manifest(tmp_path / "data", rows)
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    args = ["--deepspeed_config", str(ds), "--output-dir", str(run_dir), "--data", str(manifest), "--num-workers", "0",
            "--no-progress", "--image-size", "32", "--steps", "12", "--max-bad-fraction", "0.05"]
    summary = train(args)
    skipped = {(s["source"], s["reason"]) for s in summary["skipped"]["items"]}
    expected = {(f"{manifest} line 9", "not valid UTF-8: byte 0xe9 at byte 3 of column 'report'"),
                (f"{manifest} line 22 ({manifest.parent / 'img' / '20.png'})", "report has no letter or digit ('- .')"),
                (str(manifest.parent / "img" / "missing40.png"), "file not found")}
    assert skipped == expected and summary["skipped"]["count"] == 3
    assert summary["data"]["n_train"] == 96
    log = (run_dir / "run.log").read_text()
    for source, reason in expected:
        assert f"{source}: {reason}" in log
    events = [r for r in _records(run_dir) if r.get("event") == "skipped"]
    assert {(i["source"], i["reason"]) for e in events for i in e["items"]} == expected

    strict = tmp_path / "strict"
    with pytest.raises(DatasetError, match=r"2 of 98 items are bad .*line 9: not valid UTF-8.*line 22 .*no letter"):
        train([*args[:2], "--output-dir", str(strict), *args[4:-2]])
    assert not any(r["kind"] == "train" for r in _records(strict))  # stopped before training
