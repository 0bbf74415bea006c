"""Train quotopt's Transformer sharded with FSDP2, checkpoint it with torch.distributed.checkpoint.

Launch on N processes with torchrun (gloo on CPU; nccl when CUDA is available):

    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 20 --save-at 10 --checkpoint ckpt
    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 20 --checkpoint ckpt --resume

The second command loads the step-10 checkpoint and runs steps 11 to 20: its parameters equal
those of one uninterrupted 20-step run bit for bit. Run directly (``python
examples/train_fsdp.py``) the script starts a one-process group. Each rank trains on its slice
of a global batch of random tokens; FSDP2 averages the gradients, so N ranks take the steps one
process would take on the global batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint import state_dict as sd
from torch.distributed.device_mesh import init_device_mesh

import quotopt
from quotopt.distributed import fully_shard_groups
from quotopt.models import Transformer

OPTIMISERS = {
    "adam": lambda groups, lr: quotopt.QuotientAdam(groups, lr=lr),
    "muon": lambda groups, lr: quotopt.QuotientMuon(groups, lr=lr),
    "sgd": lambda groups, lr: quotopt.QuotientSGD(groups, lr=lr, momentum=0.9),
}
VOCAB, LEN = 64, 32


def _start() -> tuple[bool, str]:
    """(whether this call started the process group, device type)."""
    device = "cuda" if torch.cuda.is_available() and "RANK" in os.environ else "cpu"
    if dist.is_initialized():
        return False, device
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True, device


def _states(model, optimiser, step: int = 0) -> dict:
    return {
        "model": sd.get_model_state_dict(model),
        "optim": sd.get_optimizer_state_dict(model, optimiser),
        "step": torch.tensor(step),
    }


def run(
    steps: int = 20,
    *,
    optimiser: str = "adam",
    by: str = "heads",
    lr: float = 1e-3,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    batch: int = 8,
    checkpoint: str | None = None,
    save_at: int | None = None,
    resume: bool = False,
) -> dict:
    """Train ``steps`` steps (from ``checkpoint`` when ``resume``), saving at step ``save_at``.
    Returns the last loss, the step reached and every parameter in full (on every rank)."""
    started, device = _start()
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if batch % world:
            raise ValueError(f"batch ({batch}) must be divisible by the world size ({world})")
        mesh = init_device_mesh(device, (world,))
        torch.manual_seed(0)
        model = Transformer(VOCAB, d_model, layers, heads, LEN).to(device)
        groups = fully_shard_groups(model, quotopt.symmetries(model), mesh, model.blocks, by=by)
        opt = OPTIMISERS[optimiser](groups, lr)
        start = 0
        if resume:
            states = _states(model, opt)
            dcp.load(states, checkpoint_id=checkpoint)
            sd.set_model_state_dict(model, states["model"])
            # a bundle group keeps its state on its first parameter: the others have none
            options = sd.StateDictOptions(strict=False)
            sd.set_optimizer_state_dict(model, opt, states["optim"], options=options)
            start = int(states["step"])
        gen = torch.Generator().manual_seed(1)
        data = torch.randint(0, VOCAB, (steps, batch, LEN + 1), generator=gen).to(device)
        share = batch // world
        loss = torch.zeros(())
        for step in range(start, steps):
            tokens = data[step, rank * share : (rank + 1) * share]
            opt.zero_grad()
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            if save_at is not None and step + 1 == save_at:
                dcp.save(_states(model, opt, step + 1), checkpoint_id=checkpoint)
        params = [p.full_tensor().detach().cpu() for p in model.parameters()]
        return {"loss": float(loss.detach()), "step": steps, "params": params}
    finally:
        if started:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimiser", choices=sorted(OPTIMISERS), default="adam")
    parser.add_argument("--by", choices=("heads", "rows"), default="heads")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint", default=None, help="directory of the checkpoint")
    parser.add_argument("--save-at", type=int, default=None, help="step to save at")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint first")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: one thread per process
    if (args.save_at is not None or args.resume) and not args.checkpoint:
        parser.error("--save-at and --resume need --checkpoint")
    result = run(
        args.steps, optimiser=args.optimiser, by=args.by, lr=args.lr,
        checkpoint=args.checkpoint, save_at=args.save_at, resume=args.resume,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        total = sum(float(p.double().square().sum()) for p in result["params"])
        print(f"step {result['step']}: loss {result['loss']:.4f}, sum of squares {total:.12g}")


if __name__ == "__main__":
    main()
