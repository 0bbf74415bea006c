r"""The models and tasks at whose refined critical points ``critical.count_setting`` counts flat
directions.

Settings (``SETTINGS``; every one smooth — GELU or the relational gate, no ReLU kinks — so
Newton converges quadratically):

* ``modadd``: (a + b) mod 23 on 60 % of the pairs, a 1-layer GELU ``Transformer`` (d = 12,
  2 heads of r = 6, MLP 24, tied embeddings; 1,476 parameters), λ = 1e-2; reductions
  ``heads`` (GL(r) per head: the d(d−1)/2 = 66 rotations of the stream stay flat and
  horizontal) and ``joint`` (O(d) with the heads: none left);
* ``regression``: a teacher–student regression at λ = 0. The teacher is a random tied-embedding
  ``Transformer`` (entries N(0, 0.2²)); the student, the same architecture from its default
  initialisation, learns the teacher's logits on 96 random sequences and is scored by R² on 96
  others. Tied embeddings remove the stream-scale symmetry that the gain-free final norm would
  add (``tests/dynamics/test_refine.py``). Reduction ``joint``: the whole orbit, so(d) + Σ gl(r).
  ``regression-teacher``: the same with the student at the teacher's point plus N(0, 1e-4²)
  noise and no training, so that an exact interpolating minimum (F = 0) lies next to it;
  from scratch the student fits the teacher (R² ≈ 1 on held-out sequences) but Newton from
  there does not reach round-off within its budget (a sloppy, non-convex landscape);
  ``regression-teacher-decay``: the teacher regression at λ = 1e-2, reductions ``heads`` and
  ``joint``. The teacher is moved to its balanced point (dressed by the joint group) and the
  training targets are shifted by ``teacher_targets`` so that the teacher is an exact
  critical point of F; the student starts there plus N(0, 1e-6²) noise (at 1e-4 the trust
  region leaves the critical point, which need not be a minimum of F);
  ``regression-teacher-decay-wide``: the same at d = 16 (2 heads of r = 8, MLP 32, 2,368
  parameters), vocabulary 16 and 192 training sequences (counted in minutes here);
  ``regression-teacher-decay-large``: the same at d = 22 (2 heads of r = 11, MLP 44, 4,400
  parameters), vocabulary 20 and 256 training sequences, below the dense limit of 5,000 (about
  40 minutes on 2 cores); ``regression-teacher-decay-xl``: d = 24 (2 heads of r = 12, MLP 48,
  5,280 parameters), vocabulary 24, above the dense limit: refined matrix-free, the level
  directions' Hessian residuals reported, not counted (``count_setting``). A teacher needs
  d ≤ V + L (vocabulary plus positions) so that every stream direction is used, and more
  residuals than parameters: otherwise J₀ has a kernel beyond the
  orbit that λθ₀ reaches, and no target shift makes the teacher critical (d = 16 with V = 8, or
  96 sequences at 4,288 parameters, measured: Newton does not converge);
  ``relational-teacher``: the λ = 0 teacher regression with the ``RelationalTransformer``
  below (vocabulary 8, 553 parameters), reductions ``declared`` and ``no-channels``. Its
  loss has symmetries the model does not declare — the rescaling of each gated hidden
  channel, (w_in[:, c]·s, w_gate[:, c]/s, w_out[c]/s), and the overall stream scale — so at
  λ = 0 those stay flat and horizontal: the count says how many;
  ``relational-teacher-decay``: the same at λ = 1e-2, the teacher balanced along its declared
  groups *and* those undeclared rescalings (``teacher.balance_teacher``; their compact parts
  are discrete, so none is level under decay), the student at the teacher plus N(0, 1e-6²);
* ``relational``: modadd (same split) with a ``RelationalTransformer`` (k = 6 channels in
  R^D, D = 4, 2 heads of r = 3, 12 hidden channels), λ = 1e-2; reductions ``declared``
  (O(k) channels, GL(r) heads, O(D) gauge: ``symmetries(model)``) and ``no-channels`` (the
  control: gauge and heads only, which leaves the k(k−1)/2 = 15 channel rotations flat).

Why the two modadd settings do not reach a critical point (measured): in the Transformer the
'=' token and its position embedding only ever feed the read-out position, so weight decay
shrinks the stream there (‖E[=] + P[2]‖ = 0.018 against 1.7 for the number tokens) and the
gain-free RMSNorm's curvature, ∝ 1/‖x‖², reaches max|λ(H)| ≈ 2.7e6 against λ = 1e-2. In the
relational model the overall stream scale is a symmetry broken only by the norm's ε, which
weight decay drives towards the same collapse. A λ > 0 teacher needs its balanced point along
that scale (θ₀ orthogonal to its generator): unbalanced, the target shift divides λθ₀'s
component along it by J₀'s near-zero singular value (≈ 8e-7·σ_max).
"""

from __future__ import annotations

__all__ = ["SETTINGS"]

_MODADD = dict(task="modadd", p=23, frac_train=0.6, steps=3000, lr=1e-2, weight_decay=1e-2)
_REGRESSION = dict(
    task="regression",
    vocab=8,
    seq_len=4,
    n_train=96,
    n_val=96,
    teacher_std=0.2,
    model="transformer",
    d_model=8,
    n_heads=2,
    d_mlp=16,
    tie_embeddings=True,
    weight_decay=0.0,
    reductions=("joint",),
)
_RELATIONAL = dict(
    model="relational",
    n_channels=6,
    d_gauge=4,
    n_heads=2,
    d_head=3,
    d_mlp_channels=12,
    reductions=("declared", "no-channels"),
)
_TEACHER_DECAY = dict(
    _REGRESSION,
    steps=0,
    lr=0.0,
    start_noise=1e-6,
    weight_decay=1e-2,
    reductions=("heads", "joint"),
)
#: name -> the setting: task and its options, model and its sizes, Adam steps and lr, λ.
SETTINGS: dict[str, dict] = {
    "modadd": dict(
        _MODADD,
        model="transformer",
        d_model=12,
        n_heads=2,
        d_mlp=24,
        tie_embeddings=True,
        reductions=("heads", "joint"),
        refine_steps=6,
    ),
    "regression": dict(_REGRESSION, steps=3000, lr=1e-2),
    "regression-teacher": dict(_REGRESSION, steps=0, lr=0.0, start_noise=1e-4),
    "regression-teacher-decay": _TEACHER_DECAY,
    "regression-teacher-decay-wide": dict(
        _TEACHER_DECAY, vocab=16, n_train=192, d_model=16, d_mlp=32
    ),
    "regression-teacher-decay-large": dict(
        _TEACHER_DECAY, vocab=20, n_train=256, d_model=22, d_mlp=44
    ),
    "regression-teacher-decay-xl": dict(
        _TEACHER_DECAY, vocab=24, n_train=256, d_model=24, d_mlp=48
    ),
    "relational-teacher": dict(
        {k: v for k, v in _REGRESSION.items() if k not in ("d_model", "d_mlp", "tie_embeddings")},
        **_RELATIONAL,
        steps=0,
        lr=0.0,
        start_noise=1e-4,
    ),
    "relational-teacher-decay": dict(
        {k: v for k, v in _REGRESSION.items() if k not in ("d_model", "d_mlp", "tie_embeddings")},
        **_RELATIONAL,
        steps=0,
        lr=0.0,
        start_noise=1e-6,
        weight_decay=1e-2,
    ),
    "relational": dict(_MODADD, **_RELATIONAL, refine_steps=6),
}
