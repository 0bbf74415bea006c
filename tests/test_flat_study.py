"""The flat phase: counts at a refined critical point, and its page.

A tiny teacher regression (λ = 0) stands in for the study's settings: the student starts at the
teacher plus noise (an exact interpolating minimum F = 0 lies nearby), Newton brings ‖∇F‖ to
round-off, and the whole joint orbit so(d) + Σ gl(r) is flat with nothing left on the
horizontal space; the student predicts held-out sequences (R²)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from quotopt.dynamics import critical
from quotopt.study import flat

TINY = dict(
    critical.SETTINGS["regression-teacher"], vocab=5, seq_len=3, n_train=40, n_val=40,
    d_model=4, n_heads=1, d_mlp=4, start_noise=1e-6, name="tiny",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_result():
    return critical.count_setting(TINY)


@pytest.mark.slow
def test_tiny_regression_counts_the_whole_orbit_at_round_off(tiny_result):
    r = tiny_result
    assert r["refine"]["converged"] and r["refine"]["grad_rel"] <= 1e-9
    assert r["val_r2"] >= 0.9 and r["level"] == "all"
    c = r["counts"]["joint"]
    # so(4) + gl(4) (QK) + gl(4) (OV) = 6 + 16 + 16
    assert c["orbit_dim"] == c["expected_flat"] == 38 and c["compact_orbit_dim"] == 6 + 6 + 6
    assert (c["flat_total"], c["flat_horizontal"]) == (38, 0)
    assert c["flat_by_tolerance"]["1e-10"] == [38, 0]


@pytest.mark.slow
def test_control_counts_before_refinement_are_not_the_orbit():
    """The same start counted without refinement (refine_steps = 0): at ‖∇F‖ > 0 the count is
    not the orbit dimension."""
    r = critical.count_setting(dict(TINY, start_noise=1e-2), refine_steps=0)
    c = r["counts"]["joint"]
    assert not r["refine"]["converged"]
    assert (c["flat_total"], c["flat_horizontal"]) != (38, 0)


def test_flat_markdown_renders_every_setting(tiny_result, tmp_path, monkeypatch):
    failed = {"setting": {"name": "broken"}, "error": "ValueError: no"}
    text = flat.flat_markdown([tiny_result, failed])
    assert text.startswith("## Flat directions") and "2602.18948" in text
    assert "### tiny" in text and "val R²" in text and "O(d) jointly with GL(r)" in text
    assert "| 38 | 18 | 38 | 38 | 0 |" in text and "Failed: ValueError: no" in text
    assert "tiny (joint): flat_total 38 against 38 expected, flat_horizontal 0" in text
    assert "as the paper claims" in text and "not converged" not in text
    # the phase alone: one cached JSON per setting, flat.json and flat.md
    monkeypatch.setitem(critical.SETTINGS, "tiny", TINY)
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "tiny.json").write_text(json.dumps(tiny_result))
    plan = SimpleNamespace(flat=SimpleNamespace(settings=("tiny",), seed=0))
    flat.run_flat(plan, tmp_path)
    assert json.loads((tmp_path / "flat.json").read_text())[0]["counts"] == tiny_result["counts"]
    assert (tmp_path / "flat.md").read_text() == flat.flat_markdown([tiny_result])
