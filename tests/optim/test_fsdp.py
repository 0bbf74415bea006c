"""The quotient optimisers on FSDP2 (``fully_shard``, DTensor parameters), 2 CPU processes (gloo).

One module-scoped job forks 2 processes that run every experiment and save their results; the
tests compare them with single-process references computed here. float64 throughout. Sharding
by whole heads (FSDP2's default ``Shard(0)`` on the head axis, ``quotopt.distributed.
shard_heads``) and by rows (``shard_rows``: every factor split on its model-space axis).
"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import quotopt
from quotopt.distributed import fully_shard_groups
from quotopt.models import Transformer

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
STEPS = 20
CONTROL_STEPS = 5  # AdamW leaves the orbit at its first step
VOCAB, D_MODEL, LAYERS, HEADS, LEN = 23, 16, 2, 4, 12
GLOBAL_BATCH = 8
WATCHDOG_S = 240
OPTIMISERS = {
    "adam": lambda groups: quotopt.QuotientAdam(groups, lr=1e-2, weight_decay=0.1),
    "sgd": lambda groups: quotopt.QuotientSGD(groups, lr=1e-1, momentum=0.9),
    "muon": lambda groups: quotopt.QuotientMuon(groups, lr=1e-2),
}
# every optimiser, sharded by heads and by rows, on both models; and float32
MODELS, MODES = ("transformer", "llama"), ("heads", "rows")
CASES = [(kind, name, mode) for kind in MODELS for name in OPTIMISERS for mode in MODES]
CASES += [("float32", "adam", "rows")]
TOLERANCE = {"float32": 1e-5}  # float64 otherwise: 1e-10


def _llama():
    """A tiny LLaMA: 4 query heads in 2 key/value groups of r = 4, SwiGLU units, RoPE."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=24, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=2 * LEN,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def _model(gauge: bool = False, kind: str = "transformer"):
    if kind == "llama":
        model = _llama()
    else:
        torch.manual_seed(0)
        model = Transformer(VOCAB, D_MODEL, LAYERS, HEADS, LEN, activation="relu")
        model = model if kind == "float32" else model.double()
    if gauge:  # the same functions, other representatives (GL(r) per head, rescaled units)
        gen = torch.Generator().manual_seed(5)
        quotopt.gauge_transform(model, quotopt.symmetries(model), generator=gen)
    return model


def _batches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, LEN), generator=gen)


def _loss(model, tokens):
    if not isinstance(model, Transformer):
        return model(input_ids=tokens, labels=tokens).loss
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _shard(model, mode: str, mesh) -> list[dict]:
    """``fully_shard`` each block, then the root, with the placements of ``mode``; the groups."""
    blocks = model.blocks if isinstance(model, Transformer) else model.model.layers
    return fully_shard_groups(model, quotopt.symmetries(model), mesh, blocks, by=mode)


def _steps(model, optimiser, batches, rank=0, world=1) -> None:
    share = GLOBAL_BATCH // world  # FSDP averages the ranks' gradients: the global batch's
    for tokens in batches:
        optimiser.zero_grad()
        _loss(model, tokens[rank * share : (rank + 1) * share]).backward()
        optimiser.step()


def _full(model) -> list[torch.Tensor]:
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]


def _state_bytes(optimiser) -> int:
    """Bytes of the optimiser state this process holds (local shards of sharded state)."""

    def size(value):
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if isinstance(value, torch.Tensor) and value.dim():
            return value.numel() * value.element_size()
        return 0

    return sum(size(v) for state in optimiser.state.values() for v in state.values())


# ---- what each rank runs ---------------------------------------------------------------------
def _trained(name, mode, mesh, rank, steps=STEPS, gauge=False, kind="transformer"):
    model = _model(gauge, kind)
    optimiser = OPTIMISERS[name](_shard(model, mode, mesh))
    _steps(model, optimiser, _batches()[:steps], rank, WORLD)
    return model, optimiser


def _checkpointed(tmp: str, mesh, rank) -> list[torch.Tensor]:
    """QuotientAdam: 10 steps, a distributed checkpoint, a new model and optimiser loading it,
    10 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    model, optimiser = _trained("adam", "heads", mesh, rank, steps=STEPS // 2)
    saved = {
        "model": sd.get_model_state_dict(model),
        "optim": sd.get_optimizer_state_dict(model, optimiser),
    }
    dcp.save(saved, checkpoint_id=os.path.join(tmp, "checkpoint"))
    del model, optimiser, saved
    model = _model(gauge=True)  # other values everywhere: all reloaded
    optimiser = OPTIMISERS["adam"](_shard(model, "heads", mesh))
    loaded = {
        "model": sd.get_model_state_dict(model),
        "optim": sd.get_optimizer_state_dict(model, optimiser),
    }
    dcp.load(loaded, checkpoint_id=os.path.join(tmp, "checkpoint"))
    sd.set_model_state_dict(model, loaded["model"])
    # a bundle group keeps one state, on its first parameter: the others have none to load
    options = sd.StateDictOptions(strict=False)
    sd.set_optimizer_state_dict(model, optimiser, loaded["optim"], options=options)
    _steps(model, optimiser, _batches()[STEPS // 2 :], rank, WORLD)
    return _full(model)


def _nonfinite_on_one_rank(mesh, rank) -> dict:
    """Two steps, then a NaN in rank 1's shard of one gradient only: every rank must refuse."""
    model, optimiser = _trained("adam", "rows", mesh, rank, steps=2)
    optimiser.zero_grad()
    _loss(model, _batches()[2][rank * 4 : rank * 4 + 4]).backward()
    if rank == 1:
        model.blocks[0].attn.wq.grad.to_local()[0, 0, 0] = float("nan")
    before = [p.to_local().clone() for p in model.parameters()]
    state = [t.clone() for s in optimiser.state.values() for t in _tensors(s)]
    try:
        optimiser.step()
        raised = False
    except quotopt.NonFiniteStepError:
        raised = True
    params_kept = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    now = [t for s in optimiser.state.values() for t in _tensors(s)]
    state_kept = all(torch.equal(a, b) for a, b in zip(state, now))
    return {"raised": raised, "params_kept": params_kept, "state_kept": state_kept}


def _failure_on_one_rank(mesh, rank) -> dict:
    """A factorisation that fails on rank 1 only (a planted ``LinAlgError`` in its eigh), with
    whole heads per rank: every rank must refuse the step, nothing written."""
    model, optimiser = _trained("adam", "heads", mesh, rank, steps=2)
    optimiser.zero_grad()
    _loss(model, _batches()[2][rank * 4 : rank * 4 + 4]).backward()
    before = [p.to_local().clone() for p in model.parameters()]
    eigh = torch.linalg.eigh

    def planted(*args, **kwargs):
        raise torch.linalg.LinAlgError("planted failure")

    message = ""
    try:
        torch.linalg.eigh = planted if rank == 1 else eigh
        optimiser.step()
    except quotopt.NonFiniteStepError as error:
        message = str(error)
    finally:
        torch.linalg.eigh = eigh
    kept = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    return {"message": message, "params_kept": kept}


def _refusals(mesh) -> list[str]:
    """The errors of layouts that split neither whole heads nor rows, and of Muon's scope
    'tensor' on shards."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=mesh)  # FSDP2's default Shard(0): w_in (d, m) on rows, w_out on units
    errors = []
    for build in (
        lambda: quotopt.QuotientAdam(quotopt.symmetries(model)),
        lambda: quotopt.QuotientMuon(_shard(_model(), "heads", mesh), scope="tensor"),
    ):
        try:
            build()
            errors.append("")
        except ValueError as error:
            errors.append(str(error))
    return errors


def _tensors(state: dict):
    for value in state.values():
        yield from value if isinstance(value, tuple) else (value,)


def _logits(model) -> torch.Tensor:
    tokens = torch.arange(LEN - 1).remainder(VOCAB).view(1, -1)
    with torch.no_grad():
        out = model(tokens) if isinstance(model, Transformer) else model(input_ids=tokens).logits
        return out.detach().clone()


def _rank_results(rank: int, tmp: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    result = {"trained": {}}
    for kind, name, mode in CASES:
        model, optimiser = _trained(name, mode, mesh, rank, kind=kind)
        result["trained"][kind, name, mode] = _full(model)
        if (kind, name, mode) == ("transformer", "adam", "heads"):
            result["state_bytes"] = _state_bytes(optimiser)
        if (name, mode) == ("adam", "heads"):
            result["logits", kind] = _logits(model)
    result["refused"] = _refusals(mesh)
    result["resumed"] = _checkpointed(tmp, mesh, rank)
    result["checkpoint"] = os.path.join(tmp, "checkpoint")
    result["nonfinite"] = _nonfinite_on_one_rank(mesh, rank)
    result["failure"] = _failure_on_one_rank(mesh, rank)
    for kind in ("transformer", "llama"):
        model, _ = _trained("adam", "heads", mesh, rank, gauge=True, kind=kind)
        result["gauged_logits", kind] = _logits(model)
    for gauge in (False, True):  # the control: torch's AdamW on the same shards
        model = _model(gauge)
        _shard(model, "heads", mesh)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _steps(model, adamw, _batches()[:CONTROL_STEPS], rank, WORLD)
        result["adamw_logits", gauge] = _logits(model)
    return result


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang fails, with a traceback
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        torch.save(_rank_results(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of the 2-process job, one dict per rank (forked workers, as in
    ``tests/optim/test_distributed.py``)."""
    import torch._dynamo  # noqa: F401

    tmp = tmp_path_factory.mktemp("fsdp")
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True, start_method=method
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _unsharded(name: str, kind: str = "transformer"):
    model = _model(kind=kind)
    optimiser = OPTIMISERS[name](quotopt.symmetries(model))
    _steps(model, optimiser, _batches())
    return model, optimiser


def _worst(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize(("kind", "name", "mode"), CASES)
def test_sharded_steps_equal_unsharded_steps(ranks, one_thread, kind, name, mode):
    model, _ = _unsharded(name, kind)
    reference = [p.detach() for p in model.parameters()]
    for result in ranks:
        assert _worst(result["trained"][kind, name, mode], reference) <= TOLERANCE.get(kind, 1e-10)
    start = [p.detach() for p in _model(kind=kind).parameters()]
    assert _worst(reference, start) > 1e-2  # it trained


def test_each_rank_holds_half_the_optimiser_state(ranks, one_thread):
    _, optimiser = _unsharded("adam")
    whole = _state_bytes(optimiser)
    held = [r["state_bytes"] for r in ranks]
    assert sum(held) == pytest.approx(whole, rel=0.02)  # step counters are replicated
    assert all(abs(h / whole - 1 / WORLD) < 0.05 for h in held)


def test_distributed_checkpoint_resumes_bit_exactly(ranks):
    for result in ranks:
        uninterrupted = result["trained"]["transformer", "adam", "heads"]
        assert all(torch.equal(a, b) for a, b in zip(result["resumed"], uninterrupted))


def test_a_sharded_checkpoint_loads_in_one_process(ranks, one_thread):
    """The step-10 checkpoint of 2 ranks, loaded into an unsharded model and optimiser (no
    process group): 10 more steps reach the sharded run's step 20 (to the rounding by which
    sharded and unsharded steps differ)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    model = _model(gauge=True)  # other values: everything is loaded
    optimiser = OPTIMISERS["adam"](quotopt.symmetries(model))
    optimiser.init_state()  # else set_optimizer_state_dict's own initialisation steps
    state = {
        "model": sd.get_model_state_dict(model),
        "optim": sd.get_optimizer_state_dict(model, optimiser),
    }
    with pytest.warns(UserWarning, match="load in a single process"):  # no process group
        dcp.load(state, checkpoint_id=ranks[0]["checkpoint"], no_dist=True)
    sd.set_model_state_dict(model, state["model"])
    options = sd.StateDictOptions(strict=False)
    sd.set_optimizer_state_dict(model, optimiser, state["optim"], options=options)
    _steps(model, optimiser, _batches()[STEPS // 2 :])
    sharded = ranks[0]["trained"]["transformer", "adam", "heads"]
    assert _worst([p.detach() for p in model.parameters()], sharded) <= 1e-10


def test_nonfinite_gradient_on_one_rank_is_refused_on_every_rank(ranks):
    for result in ranks:
        assert result["nonfinite"] == {"raised": True, "params_kept": True, "state_kept": True}


def test_a_factorisation_failing_on_one_rank_is_refused_on_every_rank(ranks):
    assert "planted failure" in ranks[1]["failure"]["message"]
    assert "failed on another process" in ranks[0]["failure"]["message"]
    assert all(r["failure"]["params_kept"] for r in ranks)


def test_gauge_equivariance_holds_sharded(ranks):
    """Runs from p and p·g compute the same function after 20 sharded steps; torch's AdamW on
    the same shards does not (the control, 5 steps)."""
    for result in ranks:
        for kind in ("transformer", "llama"):
            same = result["logits", kind] - result["gauged_logits", kind]
            assert float(same.abs().max()) <= 1e-9 * float(result["logits", kind].abs().max())
        control = result["adamw_logits", False] - result["adamw_logits", True]
        assert float(control.abs().max()) > 1e-3
    for kind in ("transformer", "llama"):  # the gauge moved the parameters
        moved = [p.detach() for p in _model(gauge=True, kind=kind).parameters()]
        assert _worst(moved, [p.detach() for p in _model(kind=kind).parameters()]) > 1e-2


def test_shards_that_split_neither_heads_nor_rows_are_refused(ranks):
    for result in ranks:
        mixed, tensor_scope = result["refused"]
        assert "mlp.units" in mixed and "split neither whole heads" in mixed
        assert "scope='tensor'" in tensor_scope
