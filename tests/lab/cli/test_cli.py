"""The ``quotopt`` command: every subcommand at tiny sizes, bit-exact resume, Ctrl-C
checkpoints, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import quotopt
from quotopt.lab import training
from quotopt.lab.cli.main import main


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's global thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["--task", "sort", "--size", "tiny", "--eval-every", "2", "--quiet", "--threads", "1"]


def _train(out, steps, *extra):
    return main(["train", *TINY, "--steps", str(steps), "--out", str(out), *extra])


def _params(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model, optim", [("transformer", "adamw"), ("relational", "qadam")])
def test_train_writes_metrics_checkpoint_summary(tmp_path, capsys, model, optim):
    assert _train(tmp_path, 4, "--model", model, "--optim", optim) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    for key in ("train_loss", "val_loss", "val_exact_match", "wall_time", "gauge_drift"):
        assert all(key in r for r in records), key
    assert records[-1]["head_imbalance"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["optim"] == optim
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and {"model", "optimizer", "data_rng", "torch_rng"} <= ckpt.keys()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("optim", ["adamw", "qadam"])
def test_resume_is_bit_exact(tmp_path, optim):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, 6, "--optim", optim) == 0
    assert _train(split, 3, "--optim", optim) == 0
    assert _train(split, 6, "--optim", optim, "--resume") == 0
    _assert_same(_params(straight), _params(split))
    steps = [
        json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 2, 3, 4, 6]


def test_ctrl_c_mid_step_leaves_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(straight, 6) == 0
    real, calls = training.loop.train_step, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 4:  # inside step 4, after its batch was drawn
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(training.loop, "train_step", interrupting)
    assert _train(stopped, 6) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "checkpoint.pt" in err
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(training.loop, "train_step", real)
    assert _train(stopped, 6, "--resume") == 0
    _assert_same(_params(straight), _params(stopped))


def test_interrupt_between_steps_raises_interrupted(tmp_path):
    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    cfg = training.RunConfig("sort", steps=5, size="tiny", eval_every=5)
    with pytest.raises(training.Interrupted) as info:
        training.train(cfg, tmp_path, on_step=stop)
    assert info.value.step == 2 and info.value.checkpoint == tmp_path / "checkpoint.pt"
    summary = training.train(dataclasses_replace(cfg, steps=3), tmp_path, resume=True)
    assert summary["steps"] == 3


def test_sigint_is_deferred_to_the_step_boundary(tmp_path):
    def ctrl_c(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only flags it

    cfg = training.RunConfig("sort", steps=5, size="tiny", eval_every=5)
    # a known disposition to restore: a shell without job control starts background jobs
    # with SIGINT ignored, which the run would (rightly) restore instead
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(training.Interrupted) as info:
            training.train(cfg, tmp_path, on_step=ctrl_c)
        assert info.value.step == 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_compare_reports_every_seed(tmp_path, capsys):
    argv = [
        "compare",
        "--task",
        "sort",
        "--size",
        "tiny",
        "--optims",
        "adamw,qadam",
        "--gauges",
        "none",
    ]
    argv += ["--seeds", "0,1", "--steps", "4", "--eval-every", "2", "--quiet", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for optim in ("adamw", "qadam"):
        assert sum(line.startswith(f"| {optim} | 0.") for line in report.splitlines()) == 1
        for seed in (0, 1):
            assert f"| {optim} | {seed} |" in report
    assert "not reached" in report and "±" in report
    for name in ("loss.png", "dynamics.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert len(runs) == 4 and all(len(r["records"]) == 3 for r in runs)
    assert "report.md" in capsys.readouterr().out
    ckpt = tmp_path / "runs" / "qadam-seed1" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert main([*argv, "--out", str(tmp_path), "--resume"]) == 0  # finished runs are reused
    assert ckpt.stat().st_mtime_ns == stamp


def test_spectrum_json(tmp_path, capsys):
    argv = ["spectrum", "--task", "modadd", "--steps", "200", "--json", "--quiet"]
    assert main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly the JSON object
    assert result == json.loads((tmp_path / "spectrum.json").read_text())
    assert result["weight_decay"] == 0.0 and result["method"] == "dense"
    assert result["n_params"] == sum(p.numel() for p in _tiny_model().parameters())
    assert result["orbit_dim"] == sum(result["orbit_dims"].values()) == 80
    assert result["flat_total"] >= result["orbit_dim"] > 0
    assert 0 < result["flat_total"] - result["flat_horizontal"] <= result["orbit_dim"]
    assert len(result["vertical_rayleigh"]) == result["orbit_dim"]
    assert (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"


def test_spectrum_lanczos_beyond_the_dense_limit(tmp_path, capsys, monkeypatch):
    from quotopt.dynamics import model_flat

    monkeypatch.setattr(model_flat, "DENSE_MAX", 100)
    argv = ["spectrum", "--task", "sort", "--steps", "5", "--json", "--quiet"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "lanczos" and result["flat_total"] is None
    assert len(result["eigenvalues"]) == 6 and len(result["vertical_rayleigh"]) == 80
    assert len(result["vertical_residual"]) == 80 and result["max_vertical_residual"] >= 0


def _tiny_model():
    return training.build_model(training.build_task("modadd", "tiny"), "transformer", "tiny")


def test_bench_reports_missing_scripts_and_runs_present_ones(tmp_path, capsys):
    assert main(["bench", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("is missing; skipped") == 3 and "Traceback" not in captured.err
    script = "def main(argv):\n    print('ratio table', argv)\n"
    (tmp_path / "bench_models.py").write_text(script)
    assert main(["bench", "--dir", str(tmp_path), "--quick", "--only", "bench_models"]) == 0
    assert "ratio table ['--quick']" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--task", "nope", "--steps", "2"],
        ["train", "--task", "sort", "--model", "nope", "--steps", "2"],
        ["train", "--task", "sort", "--optim", "nope", "--steps", "2"],
        ["train", "--task", "sort", "--steps", "0"],
        ["train", "--task", "sort", "--steps", "-3"],
        ["train", "--task", "sort", "--size", "nanda", "--steps", "2"],
        ["compare", "--optims", "adamw,nope", "--steps", "2"],
        ["compare", "--seeds", "a,b", "--steps", "2"],
        ["train", "--task", "sort", "--steps", "2", "--resume"],  # no checkpoint
        ["train", "--task", "sort", "--steps", "2", "--resume", "CORRUPT"],
        ["train", "--task", "sort", "--steps", "2", "UNWRITABLE"],
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv):
    out = tmp_path / "out"
    if "CORRUPT" in argv:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    if "UNWRITABLE" in argv:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"  # a path under a regular file cannot be created
    original, argv = argv, [a for a in argv if a not in ("CORRUPT", "UNWRITABLE")]
    argv += ["--out", str(out)]
    assert main([*argv, "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("quotopt: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    if "nope" in argv:
        assert "valid" in err or "choose from" in err
    if "--resume" in argv and "CORRUPT" not in original:
        assert not out.exists()  # a refused resume creates nothing


def test_resume_refuses_another_runs_checkpoint(tmp_path, capsys):
    assert _train(tmp_path, 4) == 0
    capsys.readouterr()
    assert _train(tmp_path, 4, "--optim", "qadam", "--resume") == 1
    assert _train(tmp_path, 2, "--resume") == 1  # the checkpoint is past --steps
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "another run: optim='adamw'" in lines[0] and "> steps 2" in lines[1]


def test_console_entry_point_subprocess(tmp_path):
    cmd = [sys.executable, "-m", "quotopt.lab.cli.main", "train", "--task", "nope", "--steps", "1"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("quotopt: error:") and done.stderr.count("\n") == 1
    assert "modadd" in done.stderr and "Traceback" not in done.stderr


# ---- robustness: each case below printed a traceback, crashed or lost data before -----------
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("quotopt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _no_temporary_files(out):
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"quotopt {quotopt.__version__}\n"


def test_diverged_run_logs_null_and_stops_with_a_verdict(tmp_path, capsys):
    assert _train(tmp_path, 40, "--lr", "1e4") == 0  # AdamW at lr 1e4 blows up
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "diverged at step" in out
    records = training.read_records(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"]["step"] == records[-1]["step"] == summary["steps"] < 40
    assert summary["diverged"]["reason"] == "non-finite parameters"
    metrics = {k: v for k, v in records[-1].items() if k not in ("step", "wall_time", "train_time")}
    assert metrics and all(v is None for v in metrics.values())
    assert all(v is not None for v in records[0].values())  # the control: a finite model


@pytest.mark.parametrize(
    "option", [["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--weight-decay", "-1"]]
)
def test_non_finite_or_negative_hyperparameters_are_usage_errors(tmp_path, capsys, option):
    assert _train(tmp_path / "out", 2, *option) == 2
    _one_line_error(capsys, f"argument {option[0]}")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="finite lr"):  # the library refuses them too
        training.RunConfig("sort", lr=math.inf).resolved()


def test_too_many_threads_is_a_usage_error(tmp_path, capsys):
    argv = ["train", "--task", "sort", "--steps", "2", "--quiet", "--threads", "100000"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "argument --threads", "100000 threads exceed")


def test_resume_with_another_thread_count_is_refused(tmp_path, capsys):
    assert _train(tmp_path, 2) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["threads"] == 1  # recorded (TINY runs with --threads 1)
    ckpt["threads"] = 7
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    assert _train(tmp_path, 4, "--resume") == 1
    _one_line_error(capsys, "written with 7 torch threads", "--threads 7")
    assert training.read_records(tmp_path)[-1]["step"] == 2  # nothing was touched


def test_checkpoint_without_its_optimizer_is_one_line(tmp_path, capsys):
    assert _train(tmp_path, 2) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    assert _train(tmp_path, 4, "--resume") == 1
    _one_line_error(capsys, "incomplete", "optimizer")


def test_existing_run_directory_needs_resume_or_force(tmp_path, capsys):
    assert _train(tmp_path, 2) == 0
    stamp = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert _train(tmp_path, 4) == 1
    _one_line_error(capsys, "already holds a run", "--resume", "--force")
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == stamp  # untouched
    assert _train(tmp_path, 4, "--resume", "--force") == 1
    _one_line_error(capsys, "give one of them")
    assert _train(tmp_path, 4, "--force") == 0  # a fresh run replaces the old one
    assert [r["step"] for r in training.read_records(tmp_path)] == [0, 2, 4]
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "report.md").write_text("an earlier comparison")
    argv = ["compare", "--task", "sort", "--size", "tiny", "--steps", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cmp")]) == 1
    _one_line_error(capsys, "already holds a run (report.md)")


def _full_disk(error):
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")  # the writer got this far
        raise error

    return save


@pytest.mark.parametrize(
    "error, needle",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)),
        # torch's C++ stream writer reports a failed write as a RuntimeError assertion
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64"), "full"),
    ],
)
def test_full_disk_is_one_line_and_leaves_no_temporary_file(
    tmp_path, capsys, monkeypatch, error, needle
):
    monkeypatch.setattr(torch, "save", _full_disk(error))
    assert _train(tmp_path, 2) == 1
    err = _one_line_error(capsys, "checkpoint.pt", needle)
    assert "enforce fail" not in err
    _no_temporary_files(tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_spectrum_refuses_an_analysis_beyond_its_memory_limit(tmp_path, capsys):
    argv = ["spectrum", "--task", "modadd", "--size", "nanda", "--steps", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "nanda")]) == 1  # before: tens of GB
    _one_line_error(capsys, "lanczos", "226,176 parameters", "would need at least", "GB")
    assert not (tmp_path / "nanda").exists()  # refused before training
    argv = ["spectrum", "--task", "modadd", "--steps", "1", "--quiet", "--max-memory", "0.001"]
    assert main([*argv, "--out", str(tmp_path / "tiny")]) == 1
    _one_line_error(capsys, "dense", "above --max-memory 0.001")


def test_lost_rank_is_a_logged_metric(tmp_path, monkeypatch):
    from quotopt import QuotientAdam

    class Reporting(QuotientAdam):  # stands for an optimiser whose heads 0 and 2 lost rank
        def rank_deficient_heads(self):
            return {"blocks.0.attn.qk": [0, 2]} if self.state else {}

    def build(b):  # the groups the run detected
        return Reporting(b.groups, lr=b.lr, betas=b.betas, weight_decay=b.weight_decay)

    entry = dataclasses.replace(training.OPTIMIZERS["qadam"], name="reporting")
    entry = dataclasses.replace(entry, build={"full": build})
    monkeypatch.setitem(training.OPTIMIZERS, "reporting", entry)
    cfg = training.RunConfig("sort", optim="reporting", steps=2, size="tiny", eval_every=2)
    training.train(cfg, tmp_path)
    assert [r["rank_deficient_heads"] for r in training.read_records(tmp_path)] == [0, 2]
    training.train(dataclasses_replace(cfg, optim="adamw"), tmp_path / "adamw")
    assert "rank_deficient_heads" not in training.read_records(tmp_path / "adamw")[-1]


def test_a_bug_is_one_line_and_warnings_are_one_line_each(tmp_path, capsys, monkeypatch):
    import warnings

    def broken(*args, **kwargs):
        warnings.warn("heads [1] lost\nrank", UserWarning, stacklevel=1)
        raise KeyError("optimizer")  # stands for a bug anywhere below the command

    monkeypatch.setattr(training, "train", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pytest turns warnings into errors; show this one
        assert _train(tmp_path, 2) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "quotopt: warning: UserWarning: heads [1] lost rank"
    assert lines[1].startswith("quotopt: internal error: KeyError: 'optimizer'")
    assert len(lines) == 2
