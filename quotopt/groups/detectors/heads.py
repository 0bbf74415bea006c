r"""Query/key candidates shared by the detectors of attention (``torch.nn``, Hugging Face).

Biases by role (``docs/theory/bundles.md``): a query bias is the last row of its factor; a key
bias is not a coordinate when the scores have no RoPE — it adds q·b_k to every score of a query,
which softmax removes — so an option lists it in ``frozen`` (its own group, ``lr = 0``, no decay)
or, inside a fused bias, leaves it out of the point. Under RoPE the key bias is rotated by the
key's position and matters: then it is a row of the key factor.
"""

from __future__ import annotations

from dataclasses import replace

import manifolds as M

from ..candidates import Option
from ..layouts import ProjectionHeads, Rows

__all__ = ["head_options"]


def head_options(name, params, specs_qk, bundle_args, metric, frozen=(), rotary=(), partial=None):
    """Options of a query/key slot, the larger group first: full GL(r) (``HeadQK``); with
    ``partial`` = k rotary coordinates of r, the commutant of rotations on the first k only —
    RoPE's on those, GL(r − k) on the rest (a ``ProductBundle``); then the RoPE commutant on all
    r, for each pairing in ``rotary``. Under RoPE the key bias is a row (``specs_qk`` is (q, k
    without bias, k with bias))."""
    n, rows_a, r, rows_b = bundle_args
    (q_spec, k_plain), k_rotary = specs_qk[:2], specs_qk[2] if len(specs_qk) > 2 else None
    options = [
        Option(
            {
                "params": params,
                "bundle": M.HeadQK(n, rows_a, r, metric, factor_rows=(rows_a, rows_b)),
                "layout": ProjectionHeads([q_spec, k_plain], "query/key heads"),
                "name": name,
            },
            "GL(r) per head",
            frozen,
        )
    ]
    k_spec, rows_k = (k_rotary, rows_b + 1) if k_rotary is not None else (k_plain, rows_b)
    full = []
    for pairing in rotary if r % 2 == 0 else ():
        bundle = M.RotaryQK(n, rows_a, r, metric, pairing=pairing, factor_rows=(rows_a, rows_k))
        layout = ProjectionHeads([q_spec, k_spec], f"query/key heads, RoPE {pairing}")
        full.append(
            Option(
                {"params": params, "bundle": bundle, "layout": layout, "name": name},
                f"RoPE commutant ({pairing})",
            )
        )
    if partial is not None and 0 < partial < r and partial % 2 == 0:

        def cut(spec: Rows, rotated: bool) -> Rows:  # the rotated or the passed coordinates
            return replace(
                spec, index=spec.index[..., :partial] if rotated else spec.index[..., partial:]
            )

        for pairing in rotary:
            rope = M.RotaryQK(
                n, rows_a, partial, metric, pairing=pairing, factor_rows=(rows_a, rows_k)
            )
            rest = M.HeadQK(n, rows_a, r - partial, metric, factor_rows=(rows_a, rows_b))
            specs = [cut(q_spec, True), cut(k_spec, True), cut(q_spec, False), cut(k_plain, False)]
            layout = ProjectionHeads(specs, f"query/key heads, partial RoPE {pairing}")
            options.append(
                Option(
                    {
                        "params": params,
                        "bundle": M.ProductBundle([rope, rest]),
                        "layout": layout,
                        "name": name,
                    },
                    f"partial RoPE commutant ({pairing} on {partial} of {r}) x GL({r - partial})",
                )
            )
    return options + full  # the larger group first: GL(r), partial commutant, (C*)^(r/2)
