"""Every script in examples/ runs: import it and call ``run()`` at tiny sizes (seconds each)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTED = {
    "quickstart",
    "wrap_and_verify",
    "gauge_equivariance",
    "relational_vs_adamw",
    "flat_directions",
    "pymanopt_head_quotient",
    "train_fsdp",
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"quotopt_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_runnable_as_a_script():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    assert scripts == TESTED, f"untested or missing examples: {scripts ^ TESTED}"
    for name in scripts:
        text = (EXAMPLES / f"{name}.py").read_text()
        assert "def run(" in text and 'if __name__ == "__main__":' in text, name


def test_quickstart(capsys):
    result = _load("quickstart").run(steps=3)
    assert result["groups"][-1] == "plain" and "blocks.0.attn.qk" in result["groups"]
    assert math.isfinite(result["train_loss"]) and 0.0 <= result["val_accuracy"] <= 1.0


def test_wrap_and_verify(capsys):
    results = _load("wrap_and_verify").run(d_model=8, n_heads=2, seq_len=4, batch=2)
    for model in ("Transformer", "TransformerEncoder", "custom"):
        assert results[model] and max(results[model].values()) <= 1e-9, (model, results[model])
    assert min(results["custom (wrong)"].values()) > 1e-3
    assert "output change" in capsys.readouterr().out


def test_gauge_equivariance(capsys):
    results = _load("gauge_equivariance").run(n_heads=1, d=5, r=2, steps=10)
    for name in (
        "QuotientAdam, invariant",
        "QuotientAdam, euclidean",
        "QuotientSGD(0.9), invariant",
    ):
        assert results[name][0] <= 1e-10, (name, results[name])
    assert not results["torch Adam"][0] <= 1e-6  # not equivariant (or diverged: nan)


def test_relational_vs_adamw(capsys):
    results = _load("relational_vs_adamw").run(
        steps=3, n_channels=4, d_gauge=2, n_layers=1, batch_size=8
    )
    assert set(results) == {"AdamW", "QuotientAdam"}
    for metrics in results.values():
        assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_flat_directions(capsys):
    results = _load("flat_directions").run(d=4, r=2)
    minimum, decayed = results["factorisation"].values()
    assert (minimum.orbit_dim, minimum.flat_total, minimum.flat_horizontal) == (4, 4, 0)
    assert decayed.flat_total == 1  # only O(2) stays flat under L2 decay
    rows = results["transformer"]
    assert rows["all three"].orbit_dim == 30 and rows["all three"].flat_horizontal == 9
    assert rows["+ 9 undeclared directions"].flat_horizontal == 0


def test_pymanopt_head_quotient(capsys):
    pytest.importorskip("pymanopt")
    results = _load("pymanopt_head_quotient").run(d=5, r=1, n_heads=1, observed=0.9)
    for label, r in results.items():
        assert r["relative_error"] < 1e-6, (label, r)


def test_train_fsdp_resumes_bit_exactly(tmp_path):
    """One process (a one-rank group): 4 steps, against 2 steps, a checkpoint and 2 more."""
    example = _load("train_fsdp")
    tiny = dict(d_model=16, layers=1, heads=2, batch=2)
    whole = example.run(steps=4, **tiny)
    example.run(steps=4, checkpoint=str(tmp_path / "ckpt"), save_at=2, **tiny)
    resumed = example.run(steps=4, checkpoint=str(tmp_path / "ckpt"), resume=True, **tiny)
    assert all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"]))
    start = example.run(steps=0, **tiny)["params"]
    assert any(not torch.equal(a, b) for a, b in zip(whole["params"], start))
