"""Every numeric option of every command refuses nan, negative and out-of-range values as a
one-line usage error before anything is created; values the run itself refuses (a batch larger
than the data) fail before the output directory exists; a command that fails after creating
its directory removes it; Ctrl-C while the command starts is one line and exit status 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quotopt.lab import training
from quotopt.lab.cli.main import build_parser, main

QUOTOPT = str(Path(sys.executable).with_name("quotopt"))
TRAIN = ["train", "--task", "sort", "--size", "tiny", "--steps", "2"]
SPECTRUM = ["spectrum", "--size", "tiny", "--steps", "2"]
FINETUNE = ["finetune", "--quick"]
STUDY = ["study", "--quick"]
QUANTISE = ["quantise", "--quick"]

BAD = [
    (TRAIN, "--steps", ["0", "-1", "nan", "1.5"]),
    (TRAIN, "--eval-every", ["0", "-2"]),
    (TRAIN, "--batch-size", ["-1", "nan"]),
    (TRAIN, "--seed", ["-1", str(2**64), "1e3"]),
    (TRAIN, "--lr", ["nan", "-1", "0", "inf"]),
    (TRAIN, "--weight-decay", ["nan", "-1e-3", "inf"]),
    (TRAIN, "--threads", ["0", "-1", "100000"]),
    (TRAIN, "--out", [""]),
    (SPECTRUM, "--rel-tol", ["nan", "-1", "0", "1", "inf"]),
    (SPECTRUM, "--max-memory", ["nan", "-1", "0"]),
    (SPECTRUM, "--seed", [str(2**64)]),
    (STUDY, "--workers", ["0", "-1", "100000"]),
    (STUDY, "--out", [""]),
    (STUDY, "--docs", [""]),
    (FINETUNE, "--max-extend", ["-1", "100", "nan"]),
    (FINETUNE, "--steps", ["0", "-5"]),
    (FINETUNE, "--pretrain-steps", ["0"]),
    (FINETUNE, "--seeds", ["-1", f"0,{2**64}", ","]),
    (FINETUNE, "--lrs", ["nan", "-1e-3", "1e-3,inf"]),
    (FINETUNE, "--ratios", ["0", "nan"]),
    (FINETUNE, "--dampings", ["-1"]),
    (FINETUNE, "--threads", ["0", "100000"]),
    (FINETUNE, "--cache", [""]),
    (QUANTISE, "--bits", ["int4", "W1A4", "W4A17", ""]),
    (QUANTISE, "--methods", ["gptq", ","]),
    (QUANTISE, "--steps", ["0", "-1", "nan"]),
    (QUANTISE, "--lr", ["nan", "-1", "0", "inf"]),
    (QUANTISE, "--seeds", ["-1", ","]),
    (QUANTISE, "--n-eval", ["0"]),
    (QUANTISE, "--threads", ["0"]),
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("argv", "option", "value"),
    [(argv, option, v) for argv, option, values in BAD for v in values],
    ids=lambda x: x if isinstance(x, str) else x[0],
)
def test_a_bad_number_is_a_one_line_usage_error_that_creates_nothing(
    tmp_path, capsys, argv, option, value
):
    out = tmp_path / "new" / "out"
    words = [*argv, "--quiet", "--out", str(out), f"{option}={value}"]
    assert main(words) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quotopt: error: argument {option}: ") and err.count("\n") == 1, err
    named = [value, *value.split(",")]  # a list names the value it refuses
    assert any(repr(v) in err for v in named) or f"{value} " in err and "exceed" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("value", ["1e-8", "0.5"])
def test_the_control_a_valid_rel_tol_parses(value):
    args = build_parser("spectrum").parse_args([*SPECTRUM, "--out", "x", "--rel-tol", value])
    assert args.rel_tol == float(value)


def test_a_batch_larger_than_the_data_fails_before_creating_the_directory(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main([*TRAIN, "--quiet", "--out", str(out), "--batch-size", "100000000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_size 100000000 exceeds the" in err
    assert "training examples of sort tiny" in err and not (tmp_path / "new").exists()
    assert main([*TRAIN, "--quiet", "--out", str(out), "--batch-size", "8"]) == 0  # control


def test_a_failed_command_removes_the_directory_it_created(tmp_path, capsys, monkeypatch):
    from quotopt.lab.training import loop

    def fail(*args, **kwargs):
        raise RuntimeError("the run failed")

    monkeypatch.setattr(loop, "_train", fail)  # fails after the directory was created
    created = tmp_path / "new" / "out"
    assert main([*TRAIN, "--quiet", "--out", str(created)]) == 1
    assert "the run failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"  # the control: a directory the command did not create stays
    kept.mkdir()
    assert main([*TRAIN, "--quiet", "--out", str(kept)]) == 1
    assert kept.is_dir()


def test_a_failed_command_keeps_a_resumable_run(tmp_path, capsys, monkeypatch):
    from quotopt.lab.cli import spectrum

    def fail(*args, **kwargs):
        raise RuntimeError("the analysis failed")

    monkeypatch.setattr(spectrum, "model_flat_directions", fail)  # after training
    out = tmp_path / "new"
    assert main([*SPECTRUM, "--quiet", "--threads", "1", "--out", str(out)]) == 1
    assert (out / "checkpoint.pt").is_file()  # resumable: kept
    assert training.read_records(out)[-1]["step"] == 2


def _interrupt_when_loaded(library: str, cwd: Path) -> subprocess.CompletedProcess:
    """Start ``quotopt train``, send Ctrl-C as soon as ``library`` is mapped (its import under
    way), return the finished process."""
    argv = [QUOTOPT, *TRAIN[:-1], "200", "--quiet", "--out", "OUT"]
    command = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=cwd)
    maps, deadline = Path(f"/proc/{command.pid}/maps"), time.monotonic() + 120
    while library not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    command.send_signal(signal.SIGINT)
    _, err = command.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, command.returncode, "", err)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    "library",
    [
        "libtorch_cpu",  # torch, imported by the quotopt package before the entry point
        "/site-packages/scipy/",  # the command's own imports (training, dynamics), after it
    ],
)
def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path, library):
    done = _interrupt_when_loaded(library, tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "quotopt: interrupted\n", done.stderr
