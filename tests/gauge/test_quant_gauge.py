"""quotopt.gauge: the fibre of a LLaMA moves its weights and not its function (float64, 1e-9),
every compared method's transformation is exact, QuaRot's Hadamard is orthogonal, and on a model
with a planted outlier channel the search finds a representative that quantises better than the
model as given and than a random rotation. Each check has a control that fails."""

from __future__ import annotations

import copy

import pytest
import torch

from quotopt.gauge.fibre import Fibre, hadamard, random_hadamard
from quotopt.gauge.methods import METHODS
from quotopt.gauge.model import LlamaWeights, forward
from quotopt.gauge.objectives import end_to_end, outliers, weight_error
from quotopt.gauge.quantisers import QuantSpec, quantise_tokens, quantise_weight
from quotopt.gauge.represent import function_change, quantise_gauge, represent
from quotopt.gauge.search import Factor, GaugeSearch
from quotopt.optim.guard import NonFiniteStepError

transformers = pytest.importorskip("transformers")
import manifolds as M  # noqa: E402
from quotopt.groups import fold_rms_gains  # noqa: E402


def tiny_llama(seed=0, kv=2):
    """A float64 LLaMA with RoPE, grouped-query attention (4 query, ``kv`` key/value heads)
    and random RMSNorm gains, folded."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return fold_rms_gains(model)


def tokens(seed=1, shape=(3, 12)):
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


def random_elements(fibre, gen):
    shapes = fibre.shapes()

    def normal(part):
        return torch.randn(shapes[part], generator=gen, dtype=torch.float64)

    eye = torch.eye(shapes["ov"][-1], dtype=torch.float64)
    return dict(
        residual=torch.linalg.qr(normal("residual"))[0],
        ov=normal("ov") + 3 * eye,
        qk=normal("qk"),
        units=torch.rand(shapes["units"], generator=gen, dtype=torch.float64) + 0.5,
    )


def test_forward_is_the_hugging_face_forward():
    """Equal up to HF's RMSNorm, which computes in float32 (≈1e-7); a moved weight is not."""
    model, x = tiny_llama(), tokens()
    w = LlamaWeights.from_hf(model)
    hf = model(x, use_cache=False).logits.detach()
    assert float((forward(w, x) - hf).norm() / hf.norm()) < 1e-6
    w.blocks[1]["o"] = w.blocks[1]["o"] * 1.01  # control
    assert float((forward(w, x) - hf).norm() / hf.norm()) > 1e-4


@pytest.mark.parametrize("part", ["residual", "ov", "qk", "units"])
def test_every_part_of_the_fibre_keeps_the_function(part):
    model, x = tiny_llama(), tokens()
    w = LlamaWeights.from_hf(model)
    fibre = Fibre(w)
    element = random_elements(fibre, torch.Generator().manual_seed(2))[part]
    moved = fibre.act(w, {part: element})
    assert max(float((a - b).abs().max()) for a, b in zip(w.tensors(), moved.tensors())) > 1e-2
    assert function_change(w, moved, x) < 1e-12


def test_control_full_gl_on_rope_queries_and_keys_changes_the_function():
    """GL(r) on (W_q, W_k), which RoPE does not commute with, is not in the fibre."""
    model, x = tiny_llama(), tokens()
    w = LlamaWeights.from_hf(model)
    fibre = Fibre(w)
    plain = M.HeadQK(
        fibre.n_kv,
        fibre.d_model,
        fibre.d_head,
        factor_rows=(fibre.n_rep * fibre.d_model, fibre.d_model),
    )
    g = plain.random_group_element(generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    blocks = [dict(b) for b in w.blocks]
    blocks[0]["q"], blocks[0]["k"] = fibre._qk_weights(*plain.act(fibre._qk_point(blocks[0]), g))
    assert function_change(w, LlamaWeights(**{**w.__dict__, "blocks": blocks}), x) > 1e-3


def test_chosen_representative_computes_the_same_function():
    """RoPE, GQA, RMSNorm folded: the joint gauge's representative moves the float64 logits by
    < 1e-9 (by < 1e-6 through HF's forward, whose norm computes in float32)."""
    model, x = tiny_llama(), tokens(shape=(4, 13))
    before_w = LlamaWeights.from_hf(model)
    before = model(x[:, :-1], use_cache=False).logits.detach()
    report = quantise_gauge(
        model, "joint", "W4A4KV4", lambda s: (x[:, :-1], x[:, 1:]), steps=6, lr=3e-2
    )
    after_w = LlamaWeights.from_hf(model)
    assert report.function_change < 1e-9
    assert function_change(before_w, after_w, x) < 1e-9
    after = model(x[:, :-1], use_cache=False).logits.detach()
    assert float((after - before).norm() / before.norm()) < 1e-6
    moved = max(float((a - b).abs().max()) for a, b in zip(before_w.tensors(), after_w.tensors()))
    assert moved > 1e-2  # the representative is another point of the orbit
    assert set(report.before) == {"weight_error", "kurtosis", "max_over_rms", "loss"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_transformation_is_exact(method):
    model, x = tiny_llama(kv=1), tokens()
    w = LlamaWeights.from_hf(model)
    fibre = Fibre(w)
    objective = lambda m, step: end_to_end(m, QuantSpec.parse("W4A4"), x[:, :-1], x[:, 1:])  # noqa: E731
    search = GaugeSearch(
        fibre,
        w.to(torch.float32),
        METHODS[method],
        objective,
        3,
        5e-2,
        torch.Generator().manual_seed(0),
    )
    search.run()
    _, change = represent(w, fibre, search.elements(), x)
    assert change < 1e-9
    if METHODS[method]:  # control: the float32 element, not projected on O(d), is not exact
        raw = {k: v.double() for k, v in search.elements().items()}
        if "residual" in raw and method not in ("quarot", "flatquant", "heads"):
            assert function_change(w, fibre.act(w, raw), x) > 1e-9


@pytest.mark.parametrize("n", [1, 2, 32, 128, 256])
def test_hadamard_is_orthogonal(n):
    h = random_hadamard(n, torch.Generator().manual_seed(n))
    assert float((h @ h.mT - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    assert bool(((h.abs() * n**0.5 - 1).abs() < 1e-12).all())  # entries ±1/√n
    assert (
        float((hadamard(n) @ hadamard(n).mT - torch.eye(n, dtype=torch.float64)).abs().max())
        < 1e-12
    )


def test_hadamard_refuses_other_orders():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def planted_outlier_weights(seed=0, channel=5, factor=30.0):
    """A random gain-folded LLaMA (d = 32) whose residual channel ``channel`` is read with
    weights ``factor`` times the others' (an outlier channel as LLMs grow them)."""
    w = LlamaWeights.from_hf(tiny_llama(seed))
    blocks = []
    for blk in w.blocks:
        blk = {k: v.clone() for k, v in blk.items()}
        for name in ("q", "k", "v", "gate", "up"):
            blk[name][:, channel] *= factor
        blocks.append(blk)
    return LlamaWeights(**{**w.__dict__, "blocks": blocks})


def test_search_beats_rtn_and_a_random_rotation_on_a_planted_outlier():
    """Mean relative W4 per-channel RTN error ‖Q(W) − W‖²/‖W‖² of the blocks' projections,
    measured: as given (RTN) 0.0145, a random rotation 0.0113, QuaRot's random Hadamard 0.0048,
    the search (O(d) from that Hadamard, GL(r) per head, GL(1) per unit) 0.0031; the searched
    representative is exact."""
    w = planted_outlier_weights()
    quant = QuantSpec.parse("W4A16")
    fibre = Fibre(w)
    rtn = float(weight_error(w, quant))
    q = torch.linalg.qr(
        torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )[0]
    rotated = float(weight_error(fibre.act(w, {"residual": q}), quant))
    plan = (
        Factor("residual", "orthogonal", init="hadamard"),
        Factor("ov", "general"),
        Factor("units", "general"),
    )
    search = GaugeSearch(
        fibre,
        w,
        plan,
        lambda m, s: weight_error(m, quant),
        150,
        2e-2,
        torch.Generator().manual_seed(0),
    )
    start = float(weight_error(fibre.act(w, search.elements()), quant))  # the Hadamard alone
    search.run()
    chosen, change = represent(w, fibre, search.elements(), tokens())
    found = float(weight_error(chosen, quant))
    assert change < 1e-9
    assert found < start < rotated < rtn, (found, start, rotated, rtn)


def test_outlier_measures_see_the_planted_channel():
    w, x = planted_outlier_weights(), tokens()
    plain = outliers(LlamaWeights.from_hf(tiny_llama()), x)
    spiked = outliers(w, x)
    assert float(spiked["max_over_rms"]) > float(plain["max_over_rms"])  # the q/k/v input
    assert all(torch.isfinite(torch.stack(v)).all() for v in spiked["per_input"].values())


def test_quantisers():
    w = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    q = quantise_weight(w, 4)
    assert all(len(torch.unique(row)) <= 16 for row in q.detach())
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through
    q, w = q.detach(), w.detach()
    assert bool(((q - w).abs() <= w.abs().amax(1, keepdim=True) / 7 / 2 + 1e-12).all())
    grouped = quantise_weight(w.detach(), 4, 8)
    assert float((grouped - w).norm()) < float((q - w).norm())  # finer scales, smaller error
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(quantise_tokens(x, None), x)
    assert QuantSpec.parse("W4A4KV4") == QuantSpec(4, None, 4, 4)
    assert QuantSpec.parse("W4g32A16").a_bits is None and QuantSpec.parse("W4g32A16").w_group == 32
    with pytest.raises(ValueError, match="W<b>"):
        QuantSpec.parse("int4")
    with pytest.raises(ValueError, match="w_bits"):
        QuantSpec(w_bits=1)


def test_search_resumes_bit_for_bit_and_refuses_a_non_finite_step():
    w = LlamaWeights.from_hf(tiny_llama()).to(torch.float32)
    x, fibre = tokens(), Fibre(w)
    objective = lambda m, s: end_to_end(m, QuantSpec.parse("W4A4"), x[:, :-1], x[:, 1:])  # noqa: E731
    plan = METHODS["joint"]
    full = GaugeSearch(fibre, w, plan, objective, 4, 1e-2, torch.Generator().manual_seed(0))
    full.run()
    half = GaugeSearch(fibre, w, plan, objective, 4, 1e-2, torch.Generator().manual_seed(0))
    half.step(), half.step()
    resumed = GaugeSearch(fibre, w, plan, objective, 4, 1e-2, torch.Generator().manual_seed(5))
    resumed.load_state_dict(half.state_dict())
    resumed.run()
    assert all(torch.equal(full.values[k], resumed.values[k]) for k in full.values)
    bad = GaugeSearch(fibre, w, plan, lambda m, s: objective(m, s) * float("nan"), 4, 1e-2)
    start = {k: v.clone() for k, v in bad.values.items()}
    with pytest.raises(NonFiniteStepError):
        bad.step()
    assert all(torch.equal(start[k], bad.values[k]) for k in start) and bad.step_count == 0


def test_quantise_command_quick_end_to_end(tmp_path, one_thread):
    import json

    from quotopt.lab.cli.main import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["quantise", "--quick", "--out", str(out), "--cache", str(cache), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == set(METHODS)
    assert all(r["function_change"] < 1e-9 for r in results["runs"])
    assert "path" not in results["pretrained"] and results["pretrained"]["key"]  # no machine's
    assert "| joint |" in (out / "report.md").read_text() and (out / "quantise.png").is_file()
    first = (out / "runs" / "joint-s0.json").read_text()
    assert main(argv + ["--resume"]) == 0  # finished runs are reused as they are
    assert (out / "runs" / "joint-s0.json").read_text() == first
    assert main(argv) == 1  # control: a second study over the first is refused


def test_a_study_interrupted_mid_run_resumes_bit_for_bit(tmp_path, one_thread, monkeypatch):
    """A learned run stopped after its first checkpoint (step ``CHECKPOINT_EVERY``) and resumed
    with ``resume=True`` takes only the steps after the checkpoint and gives the result of a
    run never interrupted, to the bit (all but its wall time)."""
    from quotopt.gauge.search import GaugeSearch
    from quotopt.lab import gauge_study
    from quotopt.lab.cli.quantise import QUICK, QUICK_PRETRAIN
    from quotopt.lab.finetune import ByteCorpus, PretrainConfig, pretrained

    pre = PretrainConfig(**QUICK_PRETRAIN)
    model, _ = pretrained(pre, tmp_path / "cache")
    data = ByteCorpus.plays(pre.seq_len, pre.max_bytes)
    every = gauge_study.CHECKPOINT_EVERY
    config = gauge_study.StudyConfig(**dict(QUICK, steps=2 * every + 5, methods=("joint",)))
    steps, original = [], GaugeSearch.step

    def counted(self, stop_at=None):
        if stop_at is not None and self.step_count == stop_at:
            raise KeyboardInterrupt  # the machine stopped mid-run
        steps.append(self.step_count)
        return original(self)

    def study(out, resume, stop_at=None):
        monkeypatch.setattr(GaugeSearch, "step", lambda s: counted(s, stop_at))
        return gauge_study.study(out, copy.deepcopy(model), data, config, resume=resume)

    whole = study(tmp_path / "whole", resume=False)["runs"][0]
    with pytest.raises(KeyboardInterrupt):
        study(tmp_path / "stopped", resume=False, stop_at=every + 7)
    assert (tmp_path / "stopped" / "runs" / "joint-s0.pt").is_file()  # the checkpoint
    steps.clear()
    resumed = study(tmp_path / "stopped", resume=True)["runs"][0]
    assert steps == list(range(every, config.steps))  # from the checkpoint on, not from 0
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {
        k: v for k, v in whole.items() if k != "seconds"
    }
    assert not (tmp_path / "stopped" / "runs" / "joint-s0.pt").exists()  # removed when done
