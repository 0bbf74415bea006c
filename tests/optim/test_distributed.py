"""QuotientAdam under DistributedDataParallel, and row-sharded head geometry, on 2 CPU processes.

One module-scoped job spawns 2 gloo processes (rendezvous through a FileStore in a temporary
directory, so no port is needed) that run both experiments and save their results; the tests
compare them with single-process references computed here. float64 throughout.
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

import manifolds as M
import quotopt
from manifolds.testing import relative_error
from quotopt.distributed import RowShardedHeads, all_reduce_sum
from quotopt.models import Transformer

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
STEPS = 5
VOCAB, D_MODEL, LAYERS, HEADS, LEN = 23, 16, 2, 4, 12
GLOBAL_BATCH = 8
ROWS = (5, 3)  # uneven row shards of the d = 8 factor rows
WATCHDOG_S = 120


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(VOCAB, D_MODEL, LAYERS, HEADS, LEN, activation="relu").double()


def _batches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, LEN), generator=gen)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _train(model, batches, rank=0, world=1, accumulate=1) -> list[torch.Tensor]:
    """STEPS QuotientAdam steps; rank k of ``world`` sees its slice of each global batch, and
    ``accumulate`` > 1 sums the gradients of that many equal slices, each loss scaled by
    1/accumulate (the scaling by a power of two is exact)."""
    inner = model.module if hasattr(model, "module") else model
    optimiser = quotopt.QuotientAdam(quotopt.symmetries(inner), lr=1e-2, weight_decay=0.1)
    share = GLOBAL_BATCH // world
    for tokens in batches:
        optimiser.zero_grad()
        local = tokens[rank * share : (rank + 1) * share]
        for chunk in local.chunk(accumulate):
            (_loss(model, chunk) / accumulate).backward()
        optimiser.step()
    return [p.detach().clone() for p in inner.parameters()]


def _sharded_case(metric: str, cls):
    """A head bundle, point and two vectors (float64, seeded)."""
    bundle = cls(3, 8, 4, metric)
    gen = torch.Generator().manual_seed(2)
    point = bundle.random_point(generator=gen, dtype=torch.float64)
    return bundle, point, bundle.random_tangent(point, generator=gen), gen


def _row_slices(bundle, tensors, rank):
    """This rank's rows of each tensor in the bundle's layout (rows of A and of B)."""
    start = sum(ROWS[:rank])
    a, b = bundle.factors(tensors)
    return bundle.from_factors(a[:, start : start + ROWS[rank]], b[:, start : start + ROWS[rank]])


SHARDED_CASES = [(metric, cls) for metric in M.METRICS for cls in (M.HeadQK, M.HeadOV)]


def _rank_results(rank: int) -> dict:
    """Everything one rank computes (the DDP model is freed on return, before teardown)."""
    model = torch.nn.parallel.DistributedDataParallel(_model())
    result = {"ddp": _train(model, _batches(), rank, WORLD), "sharded": {}}
    for metric, cls in SHARDED_CASES:
        bundle, point, v, _ = _sharded_case(metric, cls)
        shards = RowShardedHeads(bundle)
        mine, v_mine = _row_slices(bundle, point, rank), _row_slices(bundle, v, rank)
        result["sharded"][metric, cls.__name__] = {
            "project": shards.project_horizontal(mine, v_mine),
            "gradient": shards.horizontal_gradient(mine, v_mine),
            "inner": shards.inner(mine, v_mine, v_mine),
            "dressing": shards.dressing(mine),
        }
    result["sum"] = all_reduce_sum([torch.full((2,), float(rank + 1), dtype=torch.float64)])
    return result


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang fails, with a traceback
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        torch.save(_rank_results(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of the 2-process job, one dict per rank.

    On Linux the workers are forked (0.4 s, against ~3 s per process to re-import torch when
    spawned); like DataLoader workers they set one intra-op thread before touching torch, the
    pattern that keeps forking after OpenMP use safe. torch.optim's first param group imports
    torch._dynamo (~2 s); importing it here first spares each forked worker that cost.
    """
    import torch._dynamo  # noqa: F401

    tmp = tmp_path_factory.mktemp("distributed")
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True, start_method=method
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def one_thread():
    """The single-process reference on one thread, as the workers (and quicker on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_ddp_matches_one_process_with_the_global_batch(ranks, one_thread):
    reference = _train(_model(), _batches())
    for result in ranks:
        assert relative_error(result["ddp"], reference) <= 1e-12
        worst = max(float((a - b).abs().max()) for a, b in zip(result["ddp"], reference))
        assert worst <= 1e-12
    # the replicas are bit-identical to each other
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ddp"], ranks[1]["ddp"]))
    moved = relative_error(reference, [p.detach() for p in _model().parameters()])
    assert moved > 1e-3  # the five steps did train


def test_ddp_is_bit_exact_against_gradient_accumulation(ranks, one_thread):
    """DDP averages the two ranks' gradients; one process accumulating the same two halves
    (each loss halved) adds the same two numbers: the runs agree bit for bit."""
    reference = _train(_model(), _batches(), accumulate=WORLD)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ddp"], reference))


def test_all_reduce_sum_uses_one_buffer(ranks):
    assert all(torch.equal(r["sum"][0], torch.full((2,), 3.0, dtype=torch.float64)) for r in ranks)


@pytest.mark.parametrize(("metric", "cls"), SHARDED_CASES)
def test_row_sharded_geometry_matches_the_unsharded_bundle(ranks, metric, cls):
    bundle, point, v, _ = _sharded_case(metric, cls)
    expected = {
        "project": bundle.project_horizontal(point, v),
        "gradient": bundle.horizontal_gradient(point, v),
    }
    key = (metric, cls.__name__)
    for name, full in expected.items():
        pieces = [r["sharded"][key][name] for r in ranks]
        a_parts, b_parts = zip(*(bundle.factors(p) for p in pieces))
        joined = bundle.from_factors(torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=1))
        assert relative_error(joined, full) <= 1e-12, name
    for r in ranks:
        assert float(r["sharded"][key]["inner"]) == pytest.approx(
            float(bundle.inner(point, v, v)), rel=1e-12
        )
        assert relative_error(r["sharded"][key]["dressing"], bundle.dressing(point)) <= 1e-12


def test_all_reduce_sum_without_a_process_group_is_the_identity():
    x = [torch.ones(3)]
    assert all_reduce_sum(x)[0] is x[0]


def test_row_sharded_heads_rejects_other_bundles():
    with pytest.raises(ValueError, match="supports factored bundles"):
        RowShardedHeads(M.ResidualRotation(3, axes=(0,)))
