"""Signals and concurrent writers: the study's workers end with the command however it ends
(SIGTERM, SIGKILL), a run killed mid-way resumes to the records of an uninterrupted one, a run
directory has one writer at a time, and Ctrl-C while the command starts is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quotopt.lab import training
from quotopt.lab.study.runner import train_job

QUOTOPT = str(Path(sys.executable).with_name("quotopt"))
TIMES = ("wall_time", "train_time")


def _workers(parent: int) -> list[int]:
    """Pool workers (spawned, ``--multiprocessing-fork``) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"--multiprocessing-fork" in cmdline:
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    """The process ``pid`` has ended (a zombie has ended too: it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def _released(run: Path) -> bool:
    """Whether nobody holds ``run``'s lock any more (the kernel drops it with its owner)."""
    try:
        with training.run_lock(run):
            return True
    except ValueError:
        return False


def _kill_all(pids) -> None:
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_study_workers_end_with_the_command(tmp_path, sig):
    out, docs = tmp_path / "study", tmp_path / "docs"
    argv = [QUOTOPT, "study", "--quick", "--workers", "1", "--out", str(out), "--docs", str(docs)]
    command = subprocess.Popen([*argv, "--quiet"], stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        # a worker is training a run: it holds the run directory and logged step 0
        logs = _wait(lambda: list(out.glob("runs/*/*/*/metrics.jsonl")), 300, "a run started")
        workers = _wait(lambda: _workers(command.pid), 10, "a worker")
        command.send_signal(sig)
        code = command.wait(timeout=60)
        _wait(lambda: all(_gone(w) for w in workers), 10, f"workers {workers} ended")
    finally:
        command.kill()
        _kill_all(workers)
    err = command.communicate()[1]
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and err == "quotopt: terminated by SIGTERM\n", err
    else:
        assert code == -signal.SIGKILL
    with training.run_lock(logs[0].parent):  # nobody holds the run any more
        pass


_POOL = """
import sys
from quotopt.lab import training
from quotopt.lab.study.runner import Pool, train_job
cfg = training.RunConfig("sort", size="tiny", steps=120, eval_every=10).resolved()
with Pool(1) as pool:
    pool.map(train_job, [(cfg, sys.argv[1], False)])
"""


def _same(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


@pytest.mark.slow
def test_a_run_killed_with_its_study_resumes_to_the_uninterrupted_records(tmp_path, one_thread):
    run, reference = tmp_path / "run", tmp_path / "reference"
    command = subprocess.Popen([sys.executable, "-c", _POOL, str(run)], stderr=subprocess.DEVNULL)
    workers = []
    try:
        _wait(lambda: (run / "checkpoint.pt").is_file(), 300, "a checkpoint")
        workers = _wait(lambda: _workers(command.pid), 10, "a worker")
        command.kill()
        command.wait(timeout=30)
        _wait(lambda: all(_gone(w) for w in workers), 5, f"workers {workers} ended")
        _wait(lambda: _released(run), 30, "the run directory released")
    finally:
        command.kill()
        _kill_all(workers)
    assert not (run / "summary.json").exists(), "the run finished before the kill; slow it down"
    # what a second writer or a crash leaves: records past the checkpoint, and repeats
    step = training.load_checkpoint(run / "checkpoint.pt")["step"]
    logged = training.read_records(run)
    extra = [*logged, dict(logged[-1], step=step + 10)]
    training.write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in extra))
    cfg = training.RunConfig("sort", size="tiny", steps=120, eval_every=10).resolved()
    resumed = train_job(cfg, str(run), True)
    fresh = train_job(cfg, str(reference), False)
    assert "error" not in resumed and "error" not in fresh
    steps = [r["step"] for r in resumed["records"]]
    assert steps == sorted(set(steps)) == list(range(0, 121, 10))
    assert _same(resumed["records"]) == _same(fresh["records"])
    assert resumed["summary"]["final"] == fresh["summary"]["final"]


_HOLD = """
import sys, time
from quotopt.lab import training
with training.run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_until_the_owner_dies(tmp_path):
    def train(steps, *extra):
        argv = [QUOTOPT, "train", "--task", "sort", "--size", "tiny", "--steps", str(steps)]
        argv += ["--eval-every", "2", "--threads", "1", "--quiet", "--out", str(tmp_path)]
        return subprocess.run([*argv, *extra], capture_output=True, text=True)

    assert train(4).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        before = (tmp_path / "checkpoint.pt").read_bytes()
        refused = train(8, "--resume")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"in use by another process (pid {holder.pid})" in refused.stderr
        assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing written
    finally:
        holder.kill()  # a dead owner leaves no stale lock
        holder.communicate()
    done = train(8, "--resume")
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in training.read_records(tmp_path)] == [0, 2, 4, 6, 8]
