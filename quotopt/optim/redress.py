r"""The start every bundle update shares: the gradient's sign and the re-dressing.

Re-dressing moves the point along its orbit by u = dressing(p) (``Frame.redressed``): the
point to p·u, the Euclidean gradient as a covector (``act_dual``), and the tangent moments
pushed forward by the same element (the action is linear). Invariant statistics (Adam's
per-slice second moments) need no carrying. Dressing before the first step makes a run
gauge-equivariant even under a metric that is not G-invariant: runs started anywhere on an
orbit continue from one representative (docs/theory/optimisers.md, "The Euclidean metric and
dressing").
"""

from __future__ import annotations

from manifolds.frame import Frame

__all__ = ["begin_step"]


def begin_step(frame: Frame, grad: tuple, moments: tuple, *, maximize: bool, dress: bool):
    """``(frame, grad, moments)`` a bundle step starts from: ``grad`` negated if ``maximize``;
    if ``dress``, the frame of the dressed point, the gradient carried as a covector and the
    ``moments`` (tangent vectors at the point, each a tuple like it) pushed forward."""
    if maximize:
        grad = tuple(-g for g in grad)
    if dress:
        return frame.redressed(grad, moments)
    return frame, grad, moments
