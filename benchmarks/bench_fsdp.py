"""The quotient optimisers on FSDP2: step time and the bytes the step communicates.

What is measured. ``quotopt.models.Transformer`` (default 4 layers, d = 256, 4 heads of r = 64,
MLP 1024, vocabulary 256, context 128, global batch 8; ``--quick``: 2 layers, d = 128, context
64), wrapped with ``fully_shard`` on world sizes 1 and 2 (forked CPU processes, gloo), its bundle
groups split by whole heads (``quotopt.distributed.fully_shard_groups(by="heads")``) and by rows
(``by="rows"``). Per round and rank, one training step with each optimiser on its own copy of
the model (the same batches), in the same order every round:

* ``adamw``: ``torch.optim.AdamW(model.parameters())`` on the DTensors, the reference;
* ``qadam``: ``QuotientAdam(groups)``;
* ``qmuon``: ``QuotientMuon(groups)`` with the plain group (embeddings, read-out) on its AdamW
  rule, as Muon's authors advise.

Reported per world size, sharding and optimiser: the median time of ``step()`` alone (the
slowest rank's, after a barrier; forward and backward are FSDP's and the same for all),
its ratio to AdamW's in the same round (the median of paired ratios), and the bytes of the
collectives the step itself issues per rank (all-reduce: the tensor's bytes; all-gather: the
gathered bytes), counted by wrapping ``torch.distributed.all_reduce`` / ``all_gather``. Beside
them, computed rather than measured: the bytes a gather-whole-matrix Muon (DeepSpeed's
fix of issue 7807, Dion's and torchtitan's distributed Muon) gathers per step for the same
model — every hidden matrix (W_q, W_k, W_v, W_o and the two MLP matrices of each layer) whole on
each rank — and FSDP's own traffic (parameters all-gathered for forward and backward,
gradients reduce-scattered: three times the parameter bytes), for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import quotopt
from benchmarks._timing import (
    add_common_args,
    format_table,
    median,
    paired_ratio,
    print_header,
    setup_threads,
)
from quotopt.distributed import fully_shard_groups
from quotopt.models import Transformer

MODULE = "benchmarks.bench_fsdp"
OPTIMISERS = ("adamw", "qadam", "qmuon")
SHARDINGS = ("heads", "rows")


def _sizes(args) -> dict:
    if args.tiny:
        return dict(layers=1, d=16, heads=2, mlp=32, vocab=32, context=8, batch=4, rounds=2)
    if args.quick:
        return dict(layers=2, d=128, heads=4, mlp=512, vocab=256, context=64, batch=8, rounds=5)
    return dict(layers=4, d=256, heads=4, mlp=1024, vocab=256, context=128, batch=8, rounds=10)


class _Bytes:
    """Counts the payload of ``torch.distributed.all_reduce`` / ``all_gather`` while active."""

    def __init__(self):
        self.total, self.active = 0, False
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *a, **k):
            self.total += tensor.numel() * tensor.element_size() if self.active else 0
            return self._reduce(tensor, *a, **k)

        def all_gather(outputs, tensor, *a, **k):
            size = len(outputs) * tensor.numel() * tensor.element_size()
            self.total += size if self.active else 0
            return self._gather(outputs, tensor, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _optimiser(name: str, model, groups):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "qadam":
        return quotopt.QuotientAdam(groups, lr=1e-3)
    groups = [dict(g, rule="adamw") if g.get("bundle") is None else g for g in groups]
    return quotopt.QuotientMuon(groups, lr=1e-3)


def _worker(rank: int, world: int, sizes: dict, store: str, out: str, threads: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    counter = _Bytes()
    try:
        mesh = init_device_mesh("cpu", (world,))
        runs = {}
        for sharding in SHARDINGS:
            for name in OPTIMISERS:
                torch.manual_seed(0)
                model = Transformer(
                    sizes["vocab"], sizes["d"], sizes["layers"], sizes["heads"],
                    sizes["context"], d_mlp=sizes["mlp"],
                )  # fmt: skip
                groups = quotopt.symmetries(model)
                groups = fully_shard_groups(model, groups, mesh, model.blocks, by=sharding)
                runs[sharding, name] = (model, _optimiser(name, model, groups))
        gen = torch.Generator().manual_seed(1)
        share = sizes["batch"] // world
        times = {key: [] for key in runs}
        sent = {key: [] for key in runs}
        for _ in range(sizes["rounds"] + 1):  # the first round warms up
            tokens = torch.randint(
                0, sizes["vocab"], (sizes["batch"], sizes["context"] + 1), generator=gen
            )
            mine = tokens[rank * share : (rank + 1) * share]
            for key, (model, optimiser) in runs.items():
                optimiser.zero_grad()
                logits = model(mine[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten()).backward()
                dist.barrier()
                counter.total, counter.active = 0, True
                start = time.perf_counter()
                optimiser.step()
                elapsed = torch.tensor([time.perf_counter() - start])
                counter.active = False
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[key].append(float(elapsed))
                sent[key].append(counter.total)
        if rank == 0:
            torch.save({"times": {k: v[1:] for k, v in times.items()}, "bytes": sent}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure(world: int, sizes: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        method = "fork" if sys.platform == "linux" else "spawn"
        mp.start_processes(
            _worker, args=(world, sizes, os.path.join(tmp, "store"), out, threads),
            nprocs=world, join=True, start_method=method,
        )  # fmt: skip
        return torch.load(out, weights_only=False)


def _computed(sizes: dict, world: int) -> dict:
    """Bytes per step a gather-whole-matrix Muon and FSDP itself move (float32)."""
    d, layers, mlp, vocab = sizes["d"], sizes["layers"], sizes["mlp"], sizes["vocab"]
    hidden = layers * (4 * d * d + 2 * d * mlp) * 4
    params = (hidden + (2 * vocab + sizes["context"]) * d * 4) if world > 1 else 0
    return {"gather muon": hidden if world > 1 else 0, "fsdp": 3 * params}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=10)
    parser.add_argument("--worlds", default="1,2", help="world sizes, comma-separated")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    sizes = _sizes(args)
    if args.repeats:
        sizes["rounds"] = args.repeats
    print_header("FSDP2: the quotient optimisers' step time and communication", MODULE, argv, "cpu")
    print(f"# model: {sizes}; step() alone, the slowest rank; bytes per rank and step")
    results, rows = {}, []
    for world in (int(w) for w in args.worlds.split(",")):
        measured = _measure(world, sizes, torch.get_num_threads())
        computed = _computed(sizes, world)
        for (sharding, name), times in measured["times"].items():
            ratio = paired_ratio(times, measured["times"][sharding, "adamw"])
            sent = median(measured["bytes"][sharding, name])
            results[world, sharding, name] = {
                "ms": 1e3 * median(times),
                "ratio": ratio,
                "bytes": sent,
            }
            rows.append([f"{world}", sharding, name, 1e3 * median(times), ratio, int(sent)])
        results[world, "computed"] = computed
        rows.append(
            [f"{world}", "-", "gather-matrix muon (computed)", "-", "-", computed["gather muon"]]
        )
        rows.append([f"{world}", "-", "FSDP fwd+bwd (computed)", "-", "-", computed["fsdp"]])
    headers = ["world", "sharding", "optimiser", "step ms", "x adamw", "step bytes"]
    print(format_table(headers, rows))
    return results


if __name__ == "__main__":
    main()
