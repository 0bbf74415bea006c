"""Task losses keep the logits' precision: float64 training is float64 end to end."""

from __future__ import annotations

import pytest
import torch

from quotopt.lab.tasks import get_task


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_is_computed_in_the_logits_precision_or_float32(dtype):
    task = get_task("modadd")
    x, y = task.batch("train", 4, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(*x.shape, task.vocab_size, dtype=torch.float64).to(dtype)
    total, _, _ = task.scores(logits, y)
    assert total.dtype == torch.promote_types(dtype, torch.float32)
    # the float64 loss resolves a change far below float32's resolution; float32 cannot
    tiny = logits.clone()
    tiny[..., 0] += 1e-12
    changed = task.scores(tiny, y)[0] != total
    assert bool(changed) == (dtype == torch.float64)
