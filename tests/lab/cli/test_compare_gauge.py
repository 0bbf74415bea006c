"""``quotopt compare``: the main job's defaults (optimisers, study settings, a default and a
gauge-transformed start) produce the gauge table and figures; the quotient optimisers' outcome
does not move with the gauge of the start, AdamW's does (the control)."""

from __future__ import annotations

import json

import pytest
import torch

from quotopt.lab import training
from quotopt.lab.cli import compare
from quotopt.lab.cli.main import build_parser, main

TINY = ["compare", "--size", "tiny", "--steps", "20", "--workers", "1", "--quiet"]


def _png(path) -> bool:
    return path.read_bytes()[:4] == b"\x89PNG"


def test_defaults_are_the_study_optimisers_at_its_settings_from_two_starts(tmp_path):
    args = build_parser().parse_args(["compare", "--out", str(tmp_path)])
    assert args.task == "chars" and args.size == "quick" and args.gauges == [100.0]
    assert args.optims == ["adamw", "muon", "qadam", "qmuon"] and args.seeds == [0]
    study = json.loads(compare.STUDY.read_text())["tasks"]["chars"]
    for optim, (cfg, _) in zip(args.optims, compare.configs(args)[::2]):
        assert (cfg.lr, cfg.weight_decay) == tuple(study["best"][optim])
        assert cfg.schedule == study["plan"]["schedule"] == "cosine"
    starts = [cfg.gauge_condition for cfg, _ in compare.configs(args)]
    assert starts == [None, 100.0] * 4
    assert not tmp_path.joinpath("runs").exists()


def test_settings_fall_back_to_the_registry_where_the_study_has_none():
    settings = compare._settings(str(compare.STUDY))
    tuned = compare.setting(settings, "chars", "adamw")
    assert tuned["source"].startswith("study: chars small")
    for task, optim in (("sort", "adamw"), ("chars", "sgd")):  # task, optimiser not studied
        s = compare.setting(settings, task, optim)
        assert (s["lr"], s["weight_decay"]) == training.default_hparams(optim, task)
        assert s["source"] == "registry default" and s["schedule"] is None
    default = compare.setting(None, "chars", "adamw")
    assert (default["lr"], default["weight_decay"]) == training.default_hparams("adamw", "chars")


def test_main_job_at_tiny_size_quotient_coincides_adamw_splits_float64(tmp_path, capsys):
    torch.set_default_dtype(torch.float64)  # conftest restores float32
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    assert "2 starts" in capsys.readouterr().out
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert len(result["runs"]) == 8
    spread = {optim: max(v) for optim, v in result["gauge_spread"].items()}
    assert spread["qadam"] <= 1e-6 and spread["qmuon"] <= 1e-6
    assert spread["adamw"] >= 1e-3  # the control: AdamW's outcome moves with the gauge
    report = (tmp_path / "report.md").read_text()
    assert "| final val loss, default | final val loss, κ = 100 |" in report
    assert "| steps to target, default | steps to target, κ = 100 |" in report
    for optim in ("adamw", "muon", "qadam", "qmuon"):
        assert sum(line.startswith(f"| {optim} | 0.") for line in report.splitlines()) == 1
        assert f"| {optim} | 0 | κ = 100 |" in report
    for name in ("gauge.png", "loss.png", "dynamics.png"):
        assert _png(tmp_path / name)
    assert (tmp_path / "runs" / "qmuon-seed0-gauge100" / "summary.json").is_file()


def test_registry_defaults_and_a_single_start_keep_the_old_comparison(tmp_path):
    argv = ["compare", "--task", "sort", "--size", "tiny", "--optims", "adamw,qadam"]
    argv += ["--seeds", "0,1", "--steps", "4", "--eval-every", "2", "--gauges", "none"]
    argv += ["--settings", "defaults", "--workers", "1", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert len(runs) == 4 and all(r["summary"]["config"]["gauge_condition"] is None for r in runs)
    assert {r["summary"]["config"]["lr"] for r in runs} == {
        training.default_hparams("adamw", "sort")[0]
    }
    report = (tmp_path / "report.md").read_text()
    assert "κ =" not in report and "±" in report and "not reached" in report
    assert _png(tmp_path / "gauge.png")


def test_workers_run_in_processes_and_resume_reuses_finished_runs(tmp_path):
    argv = [*TINY[:3], "--task", "sort", "--optims", "adamw,qadam", "--steps", "4"]
    argv += ["--eval-every", "2", "--workers", "2", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = tmp_path / "runs" / "qadam-seed0-gauge100" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert summary.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--gauges", "0.5", "condition numbers >= 1"),
        ("--gauges", "nan", "condition numbers >= 1"),
        ("--gauges", "inf", "condition numbers >= 1"),
        ("--gauges", "ten", "condition numbers >= 1"),
        ("--settings", "NOFILE", "no study results at"),
        ("--settings", "NOTSTUDY", "is not a study.json"),
        ("--workers", "0", "a positive integer"),
        ("--workers", "-2", "a positive integer"),
        ("--steps", "-1", "a positive integer"),
    ],
)
def test_bad_options_are_one_line_before_anything_is_created(tmp_path, capsys, option, value,
                                                             needle):  # fmt: skip
    if value == "NOFILE":
        value = str(tmp_path / "missing.json")
    if value == "NOTSTUDY":
        value = str(tmp_path / "other.json")
        (tmp_path / "other.json").write_text("[1, 2]")
    out = tmp_path / "out"
    assert main(["compare", option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
