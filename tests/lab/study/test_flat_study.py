"""The flat phase: counts at a refined critical point, and its page.

A tiny teacher regression (λ = 0) stands in for the study's settings: the student starts at the
teacher plus noise (an exact interpolating minimum F = 0 lies nearby), Newton brings ‖∇F‖ to
round-off, and the whole joint orbit so(d) + Σ gl(r) is flat with nothing left on the
horizontal space; the student predicts held-out sequences (R²)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from quotopt.lab.experiments import critical
from quotopt.lab.study import flat

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


def test_widest_gap_finds_the_flat_block_and_no_block_where_there_is_none():
    from quotopt.dynamics.flat import widest_gap

    block = [3e-15, -1e-14, 2e-13] + [1e-6, 1e-3, 0.5, 1.0]  # 3 at round-off, then curvature
    gap = widest_gap(block)
    assert gap["count"] == 3 and gap["ratio"] >= 1e6 and 2e-13 < gap["threshold"] < 1e-6
    assert widest_gap([1e-8, 1e-3, 1.0])["count"] == 0  # the smallest sits far above round-off
    spread = [10.0**-k for k in range(0, 16)]  # a decade apart down to round-off: no block
    assert widest_gap(spread)["ratio"] <= 10.0 * (1 + 1e-9)
    assert widest_gap([0.3, 1.0])["count"] == 0  # nothing below the 1e-4 ceiling


def test_teacher_with_weight_decay_is_an_exact_critical_point():
    """The λ > 0 teacher regression: dressed teacher + shifted targets give ∇F(θ₀) at
    round-off; the control (the teacher's own outputs as targets) does not."""
    from quotopt.dynamics.refine import _value_and_gradient

    small = dict(TINY, weight_decay=1e-2, start_noise=0.0, reductions=("joint",))
    task, model = critical._build(small, 0)
    params = tuple(p.detach() for p in model.parameters())
    grad = _value_and_gradient(critical._objective(task, model, 1e-2), params)[1]
    assert float(grad.norm()) <= 1e-10
    plain, model0 = critical._build(dict(small, weight_decay=0.0), 0)  # unshifted targets
    grad0 = _value_and_gradient(critical._objective(plain, model0, 1e-2), params)[1]
    assert float(grad0.norm()) >= 1e-3


def test_a_changed_setting_is_counted_again(tiny_result, tmp_path, monkeypatch):
    monkeypatch.setitem(critical.SETTINGS, "tiny", TINY)
    calls = []
    monkeypatch.setattr(critical, "count_setting", lambda s, **kw: calls.append(s) or tiny_result)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_result))
    assert flat.critical_job("tiny", 0, str(tmp_path)) == tiny_result and not calls  # reused
    stale = dict(tiny_result, setting=dict(tiny_result["setting"], d_mlp=8))
    (tmp_path / "tiny.json").write_text(json.dumps(stale))
    flat.critical_job("tiny", 0, str(tmp_path))
    assert calls == ["tiny"]


def test_verdict_separates_exact_extra_and_unconverged_counts():
    def c(total, expected, horizontal):
        return dict(flat_total=total, expected_flat=expected, flat_horizontal=horizontal)

    text = flat._verdict(
        [("a", "joint", c(52, 52, 0), True), ("a", "heads", c(52, 24, 28), True),
         ("b", "joint", c(715, 126, 592), False)]
    )  # fmt: skip
    exact, rest = text.split("At critical points too")
    assert "a (joint)" in exact and "as the paper claims" in exact
    extra, unconverged = rest.split("Elsewhere")
    assert "a (heads): flat_total 52 against 24 expected, flat_horizontal 28" in extra
    assert "b (joint)" in unconverged and "(not converged)" in unconverged
