"""What the quotient optimisers say about their steps: which heads a failed step comes from,
heads that lose rank, skipped steps and flags read from accelerators.

A mixin of ``QuotientOptimizer`` (``quotopt.optim.base``): it reads the shell's groups, cached
frames (``_frames``), rank flags (``_deficient``) and commit guard (``_guard``).
"""

from __future__ import annotations

import torch

from manifolds import unchecked

from .guard import Plan, head_flags

__all__ = ["Diagnostics"]


def _versions(tensors) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


class Diagnostics:
    """Error explanations, rank watching and the guard's counters of a quotient optimiser."""

    def _explain(self, index: int, group: dict, new_point=None) -> str:
        """Which heads of a bundle group a failed step comes from, and why (synchronises:
        called only when a step failed)."""
        params = list(group["params"])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        point, bundle = self._views(group, params), group["bundle"]
        causes = [
            ("non-finite gradient", lambda: head_flags(bundle, self._views(group, grads))),
            ("non-finite parameters", lambda: head_flags(bundle, point)),
            ("rank-deficient: a singular factor Gram", lambda: self._deficient_now(index, group)),
            ("the step overflowed", lambda: head_flags(bundle, new_point) if new_point else None),
        ]
        found, seen = [], set()
        for why, flags in causes:
            try:
                with unchecked():
                    flags = flags()
            except (torch.linalg.LinAlgError, RuntimeError, ValueError):
                continue
            heads = [] if flags is None else torch.nonzero(flags).flatten().tolist()
            heads = [h for h in heads if h not in seen]
            seen.update(heads)
            if heads:
                found.append(f"heads {heads}: {why}")
        if not found and new_point is not None:
            found.append("values too large: their sum overflows the parameters' precision")
        return f" ({'; '.join(found)})" if found else ""

    def _deficient_now(self, index: int, group: dict):
        """The deficiency flags of the group's current point (its cached frame, if current)."""
        params = list(group["params"])
        cached = self._frames.get((index,))
        if cached is not None and cached[0] == _versions(params):
            return group["bundle"].deficient_heads(cached[1])
        point = self._views(group, params)
        return group["bundle"].deficient_heads(group["bundle"].factorise(point))

    def _watch_rank(self, index, group, bundle, now: torch.Tensor, plan: Plan) -> None:
        """Flag heads that were full rank before this step and are not (``now``) after it."""
        before = self._deficient.get(index)
        plan.on_commit.append(lambda ok: self._deficient.__setitem__(index, now))
        if before is None or before.shape != now.shape:
            return
        lost = now & ~before

        def message(heads: list[int]) -> str:
            return (
                f"{group['name']}: heads {heads} of {bundle!r} lost rank (their factor Grams "
                "are singular to working precision); they are no longer re-dressed"
            )

        plan.watch.append((lost, message))

    def rank_deficient_heads(self) -> dict[str, list[int]]:
        """Per bundle group (by name), the heads whose factor Grams were singular to working
        precision at the last committed step (reads device flags: synchronises)."""
        out = {}
        for index, flags in self._deficient.items():
            heads = torch.nonzero(flags.reshape(-1)).flatten().tolist()
            if heads:
                out[self.param_groups[index]["name"]] = heads
        return out

    def raise_if_nonfinite(self, wait: bool = True) -> None:
        """Raise ``NonFiniteStepError`` (``nonfinite="skip"``: count and warn) if an earlier
        accelerator step was non-finite and was not written.

        With ``wait=False`` (what ``step()`` uses) only flags that have already reached the
        host are inspected, so nothing blocks; ``wait=True`` waits for all of them.
        """
        self._guard.read_pending(wait)

    def skipped_steps(self) -> dict[str, int]:
        """Per group (by name), how many steps were skipped (``nonfinite="skip"``) because that
        group's values were not finite or a factorisation in it failed; a skipped step writes
        nothing in any group. Waits for accelerator flags not yet read (synchronises)."""
        self._guard.read_pending(wait=True)
        return {g["name"]: self._guard.skipped.get(g["name"], 0) for g in self.param_groups}
