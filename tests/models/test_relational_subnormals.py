"""The ALiBi feature route keeps every attention weight a normal float (docs/theory/relational.md).

Far keys' ALiBi weights e^{−m(i−j)} fall below float32's smallest normal (2⁻¹²⁶); subnormal
arithmetic is ~100× slower on x86. The model leaves out keys with bias < −drop and keeps every
other weight ≥ e^{−keep} (``alibi_window``). Checked here at T = 2,048 in float32, without
``torch.set_flush_denormal``: the fused kernel's probabilities P and the backward's
dS = P ∘ (dP − rowsum(dO ∘ O)), materialised from the kernel's own inputs and output gradients,
hold no subnormal, while the same model with the window switched off holds many (the control);
the output moves by less than the bound the docs state, checked in float64 on forced windows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quotopt.models import RelationalTransformer
from quotopt.models import _relational_attention as ra
from quotopt.models._relational_attention import (
    alibi_attention,
    alibi_bias,
    alibi_slopes,
    alibi_window,
)
from tests.models.test_models import rel_err

T_LONG = 2048
TINY = torch.finfo(torch.float32).tiny


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (``conftest.one_thread``)."""


def no_window(monkeypatch) -> None:
    """Switch the window off: every head keeps its whole causal row (exact ALiBi)."""
    monkeypatch.setattr(ra, "window_nats", lambda dtype: (math.inf, math.inf))


def bench_model(n_layers: int = 1) -> RelationalTransformer:
    """The benchmark's equal-width model (k = 32, d_gauge = 4, 4 heads of rank 8)."""
    torch.manual_seed(0)
    return RelationalTransformer(256, 32, 4, n_layers, 4, T_LONG, d_head=8, d_mlp_channels=128)


def lm_batch(seq_len: int = T_LONG) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(256, (1, seq_len + 1), generator=torch.Generator().manual_seed(seq_len))
    return data[:, :-1], data[:, 1:]


def subnormals(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())


def kernel_intermediates(monkeypatch, model) -> list[tuple[int, int]]:
    """(subnormals in P, subnormals in dS) of every causal SDPA call of one forward + backward
    of the language-model loss, materialised in float32 from the call's q, k, v, output and
    output gradient: P = softmax(q kᵀ, causal), dS = P ∘ (dO vᵀ − rowsum(dO ∘ O))."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        assert kw.get("is_causal") and kw.get("attn_mask") is None
        out = sdpa(q, k, v, **kw)
        calls.append([t.detach() for t in (q, k, v, out)])
        out.register_hook(lambda g, entry=calls[-1]: entry.append(g))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    tokens, targets = lm_batch()
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
    counts = []
    for q, k, v, out, g in calls:
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        p = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(causal, -math.inf), -1)
        ds = p * (g @ v.transpose(-1, -2) - (g * out).sum(-1, keepdim=True))
        counts.append((subnormals(p), subnormals(ds)))
    return counts


def test_attention_weights_and_their_backward_hold_no_subnormal_at_t_2048(monkeypatch):
    counts = kernel_intermediates(monkeypatch, bench_model())
    assert len(counts) == 3  # heads 0 and 1 windowed (one call each), heads 2 and 3 together
    assert all(c == (0, 0) for c in counts), counts


def test_without_the_window_the_same_model_computes_with_subnormals(monkeypatch):
    """The control: exact ALiBi at T = 2,048 in float32 (one call for all heads)."""
    no_window(monkeypatch)
    ((p, ds),) = kernel_intermediates(monkeypatch, bench_model())
    assert p > 100_000 and ds > 100_000  # measured: 263,351 and 304,845


def test_windowed_model_equals_the_exact_model_to_float32_round_off(monkeypatch):
    """Logits and gradients at T = 2,048 (two layers): the windowed float32 model against the
    same weights in float64 (no window there: every m_h·(T − 1) ≤ 684), beside the unwindowed
    float32 model's own error."""
    model = bench_model(n_layers=2)
    exact = bench_model(n_layers=2).double()
    exact.load_state_dict(model.state_dict())
    tokens, targets = lm_batch()
    weight = torch.randn(1, T_LONG, 256, generator=torch.Generator().manual_seed(1))

    def run(m):
        out = m(tokens)
        loss = (out * weight.to(out.dtype)).sum()
        return [out.double(), *(g.double() for g in torch.autograd.grad(loss, m.parameters()))]

    want = run(exact)
    windowed = [rel_err(a, b) for a, b in zip(run(model), want)]
    no_window(monkeypatch)
    plain = [rel_err(a, b) for a, b in zip(run(model), want)]
    # the float32 model's own error is float32 round-off (test_relational.py's tolerance), and
    # the window adds less than that much again to every tensor; the round-off itself moves with
    # the CPU's kernels (largest tensor: 8.2e-7 on a Xeon, whose windowed model reaches 1.1e-6)
    assert max(plain) < 1e-6
    assert all(w < 2 * p for w, p in zip(windowed, plain))


def kept_mask(T: int, past: int, chunk: int) -> torch.Tensor:
    """(T, T) keys query i sees under the blocked window: all j ≤ i while i < past + chunk,
    else j ∈ [s, i] with s the start of the block where i is one of the last ``chunk``."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    start = torch.where(i < past + chunk, 0, (i - past) // chunk * chunk)
    return (j <= i) & (j >= start)


@pytest.mark.parametrize("drop, keep", [(3.0, 6.0), (5.0, 20.0)])
def test_forced_window_is_the_stated_one_and_moves_the_output_within_the_bound(
    monkeypatch, drop, keep
):
    """float64, windows forced small: the output is softmax over exactly ``kept_mask``, whose
    kept distances are ≤ keep/m and left-out ones > drop/m, and each row moves from exact ALiBi
    by at most 2·δ_i·max‖v‖ ≤ 2·T·e^{Δ_i − drop}·max‖v‖ (the docs' bound), δ_i the exact weight
    of the keys with bias < −drop. Control: the movement is not zero."""
    monkeypatch.setattr(ra, "window_nats", lambda dtype: (drop, keep))
    torch.manual_seed(2)
    B, H, T, n = 2, 4, 300, 6
    qkv = torch.randn(3, B, H, T, n, dtype=torch.float64)
    slopes = alibi_slopes(H).double()
    got = alibi_attention(qkv, slopes)
    q, k, v = qkv.unbind(0)
    exact_bias = alibi_bias(slopes, T)  # (1, H, T, T)
    exact_p = torch.softmax(q @ k.transpose(-1, -2) + exact_bias, -1)
    exact = exact_p @ v
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()
    for h, m in enumerate(slopes.tolist()):
        window = alibi_window(m, T, torch.float64)
        mask = kept_mask(T, *(window or (T, 1)))  # no window: every j ≤ i
        if window is not None:
            assert dist[mask].max() <= keep / m and dist[~mask & (dist >= 0)].min() > drop / m
        bias = exact_bias[0, h].masked_fill(~mask, -math.inf)
        want = torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) + bias, -1) @ v[:, h]
        assert rel_err(got[:, h], want) < 1e-12
        far = m * dist > drop  # keys with bias < −drop
        delta = (exact_p[:, h] * far).sum(-1)  # (B, T)
        scores = q[:, h] @ k[:, h].transpose(-1, -2)
        advantage = (scores - scores.diagonal(dim1=-2, dim2=-1)[..., None]).masked_fill(
            dist < 0, -math.inf).amax(-1)  # fmt: skip
        vmax = v[:, h].norm(dim=-1).amax(-1, keepdim=True)  # (B, 1)
        moved = (got[:, h] - exact[:, h]).norm(dim=-1)  # (B, T)
        assert (moved <= (2 * delta + 1e-12) * vmax).all()  # 1e-12: float64 round-off
        assert (delta <= T * torch.exp(advantage - drop)).all()
    assert rel_err(got, exact) > 1e-6  # control: the forced windows do change the output


def test_window_thresholds_per_dtype_and_the_steep_slope_error():
    drop, keep = ra.window_nats(torch.float32)
    assert keep == pytest.approx(-math.log(TINY) - 24) and math.exp(-keep) > 1e10 * TINY
    assert drop == pytest.approx(2.5 * -math.log(torch.finfo(torch.float32).eps))
    assert alibi_window(0.25, 254, torch.float32) is None  # 0.25 · 253 ≤ 63.3
    past, chunk = alibi_window(0.25, 255, torch.float32)  # 0.25 · 254 > 63.3
    assert (past, past + chunk - 1) == (math.ceil(drop / 0.25), math.floor(keep / 0.25))
    assert alibi_window(0.25, T_LONG, torch.float64) is None  # float64: keep = 684
    assert alibi_window(30.0, 100, torch.float32) == (2, 1)  # distances 0…2 kept: bias ≥ −60
    with pytest.raises(ValueError, match="no distance between 39.9 and 63.3"):
        alibi_window(70.0, 100, torch.float32)
