"""Train-step cost of the LoRA fine-tuning optimisers against AdamW, side by side.

What is timed: one fine-tuning step — ``zero_grad``, forward, next-byte cross-entropy,
backward, ``step()`` — of the ``quotopt finetune`` model (``quotopt.lab.finetune.PretrainConfig``'s
default LLaMA-style byte decoder: 4 layers, width 128, 4 heads; randomly initialised, since the
cost of a step does not depend on the weights) with ``peft`` LoRA adapters on q/k/v/o at each
rank, batch 8×64 bytes, each adapter optimiser of the registry
(``quotopt.lab.training.optimizers``) on its own copy of the adapted model, fed the same batch.
Every optimiser takes a few steps before timing (B ≠ 0). Candidates run once per round in a fixed
order after one warm-up round; the ratio is the median over rounds of the candidate's time over
AdamW's time in the same round (``benchmarks._timing``).

Run: ``python -m benchmarks.bench_lora [--quick] [--ranks 16,64] [--threads 1]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from benchmarks._timing import (
    add_common_args,
    alternate,
    format_table,
    median,
    paired_ratio,
    print_header,
    rounds_of,
    setup_threads,
)

MODULE = "benchmarks.bench_lora"
OPTIMS = (
    "adamw",
    "loraplus",
    "qadam-inv",
    "lora-rite",
    "balora",
    "qmuon",
    "qadam-mat",
    "riemannion",
    "riemannion-mom",
)


def _candidate(name: str, base, rank: int, batch):
    from quotopt.lab import finetune as ft
    from quotopt.lab.training.optimizers import build_adapter_optimizer

    model = ft.add_adapters(base, rank, 16.0, seed=0)
    optimiser = build_adapter_optimizer(name, model, 1e-3)
    x, y = batch

    def step():
        optimiser.zero_grad(set_to_none=True)
        ft.lm_loss(model, x, y).backward()
        optimiser.step()

    for _ in range(3):  # off B = 0
        step()
    return step


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    from quotopt.lab import finetune as ft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=20)
    parser.add_argument("--ranks", default=None, help="LoRA ranks (default 16,64; --quick: 16)")
    parser.add_argument("--optims", default=",".join(OPTIMS), help="optimisers (registry names)")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    if args.tiny:
        config = ft.PretrainConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64,
                                   seq_len=32)  # fmt: skip
        ranks, repeats, batch_shape = [2], 2, (2, 16)
    else:
        config = ft.PretrainConfig()
        ranks = [16] if args.quick else [16, 64]
        repeats, batch_shape = (8 if args.quick else 20), (8, 64)
    if args.ranks:
        ranks = [int(r) for r in args.ranks.split(",")]
    repeats = args.repeats or repeats
    optims = [n.strip() for n in args.optims.split(",") if n.strip()]
    optims = ["adamw"] + [n for n in optims if n != "adamw"]  # the reference of every ratio
    print_header(
        f"LoRA fine-tuning train step vs AdamW: width {config.hidden_size}, {config.layers} "
        f"layers, batch {batch_shape[0]}x{batch_shape[1]} bytes, ranks {ranks}",
        MODULE,
        argv,
        args.device,
    )
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config.llama())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, batch_shape, generator=gen)
    batch = (x, torch.roll(x, -1, 1))
    results: dict[str, dict[str, float]] = {}
    for rank in ranks:
        candidates = {name: _candidate(name, base, rank, batch) for name in optims}
        times = alternate(candidates, repeats)
        rows = []
        for name in optims:
            ms = 1000 * median(times[name]["total"])
            ratio = paired_ratio(times[name]["total"], times["adamw"]["total"])
            results[f"r{rank} {name}"] = {"ms": ms, "ratio": ratio}
            rows.append([name, ms, ratio])
        print(f"# rank {rank}: {rounds_of(times)} rounds; ratio = median over rounds of "
              "(time / AdamW step of that round)")  # fmt: skip
        print(format_table(["optimiser", "median ms", "x AdamW step"], rows))
    return results


if __name__ == "__main__":
    main()
