"""What a run is built from, by name: tasks at their sizes and the two architectures (the
optimisers have their own registry, ``training.optimizers``)."""

from __future__ import annotations

import torch
from torch import nn

from ...models import RelationalTransformer, Transformer
from ..tasks import TASKS, get_task

MODELS = ("transformer", "relational")
D_GAUGE = 4  # gauge dimension of relational models; their channel count matches the budget
_TINY = (dict(d_model=8, n_layers=1, n_heads=2, d_mlp=16, activation="relu"), {})
_RELU = dict(n_layers=1, n_heads=4, activation="relu")
#: task -> size -> (Transformer keyword arguments, task options); the first size is the default.
SIZES: dict[str, dict[str, tuple[dict, dict]]] = {
    "modadd": {  # "nanda": Nanda et al. 2023 (1 layer, d=128, 4 heads of 32, ReLU MLP 512)
        "nanda": (dict(_RELU, d_model=128, d_mlp=512), {}),
        "standard": (dict(_RELU, d_model=64, d_mlp=256), {"p": 59}),  # Nanda-like at half width
        "small": (dict(_RELU, d_model=32, d_mlp=128), {"p": 31}),
        "tiny": (_TINY[0], {"p": 11}),
        "quick": (dict(_RELU, d_model=32, d_mlp=128), {"p": 31, "frac_train": 0.5}),
    },
    "sort": {  # small: minGPT's sorting model
        "small": (dict(d_model=48, n_layers=3, n_heads=3), {}),
        "tiny": _TINY,
        "quick": (dict(d_model=32, n_layers=2, n_heads=2), {}),
    },
    "chars": {  # nanoGPT's CPU configuration; tiny: the first 20k characters, context 16
        "small": (dict(d_model=128, n_layers=4, n_heads=4), {}),
        "tiny": (_TINY[0], {"max_chars": 20_000, "seq_len": 16}),
        "quick": (dict(d_model=64, n_layers=2, n_heads=4), {"seq_len": 32}),
    },
    "digits": {
        "small": (dict(d_model=64, n_layers=2, n_heads=4), {}),
        "tiny": _TINY,
        "quick": (dict(d_model=32, n_layers=2, n_heads=2), {}),
    },
}
#: batch size (0: full batch), steps between evaluations, examples per evaluated split (None:
#: all), Adam betas (Nanda's for modadd, minGPT's for sort).
TASK_DEFAULTS = {
    "modadd": dict(batch_size=0, eval_every=100, eval_examples=None, betas=(0.9, 0.98)),
    "sort": dict(batch_size=64, eval_every=100, eval_examples=None, betas=(0.9, 0.95)),
    "chars": dict(batch_size=12, eval_every=250, eval_examples=256, betas=(0.9, 0.99)),
    "digits": dict(batch_size=64, eval_every=100, eval_examples=None, betas=(0.9, 0.999)),
}


def check_name(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid names are {', '.join(sorted(valid))}")


def default_size(task_name: str) -> str:
    check_name("task", task_name, TASKS)
    return next(iter(SIZES[task_name]))


def size_options(task_name: str, size: str | None) -> tuple[dict, dict]:
    """(Transformer keyword arguments, task options) of ``size`` (None: the default size)."""
    size = size or default_size(task_name)
    check_name(f"size for task {task_name}", size, SIZES[task_name])
    return SIZES[task_name][size]


def build_task(name: str, size: str | None = None, seed: int = 0):
    """The task ``name`` with the options of ``size`` (modadd ``tiny`` uses p = 11)."""
    return get_task(name, seed=seed, **size_options(name, size)[1])


_VARIANT_FIELDS = {"k": "n_channels", "D": "d_gauge", "r": "d_head", "m": "d_mlp_channels"}
_VARIANT_FLAGS = {"gauge": ("positional", "gauge"), "dressed": ("dressed", True)}


def parse_variant(name: str) -> dict:
    """RelationalTransformer keyword arguments named by a variant such as ``k64-D4-r16-m128``:
    dash-separated parts ``k<channels>``, ``D<gauge dim>``, ``r<head rank>``,
    ``m<MLP hidden channels>``, ``gauge`` (gauge-space positions instead of ALiBi) and
    ``dressed`` (the dressed model); unnamed settings keep ``build_model``'s defaults."""
    out = {}
    for part in name.split("-"):
        if part in _VARIANT_FLAGS:
            key, value = _VARIANT_FLAGS[part]
        elif part[:1] in _VARIANT_FIELDS and part[1:].isdigit() and int(part[1:]) > 0:
            key, value = _VARIANT_FIELDS[part[:1]], int(part[1:])
        else:
            raise ValueError(
                f"relational variant {name!r}: cannot read {part!r}; parts are k<int>, D<int>, "
                "r<int>, m<int>, 'gauge' and 'dressed', joined by '-'"
            )
        if key in out:
            raise ValueError(f"relational variant {name!r} sets {key} twice")
        out[key] = value
    return out


def build_model(task, model_name="transformer", size=None, variant=None) -> nn.Module:
    """A ``Transformer`` of ``size`` for ``task``, or the ``RelationalTransformer`` (d_gauge
    ``D_GAUGE``, or the settings of ``variant``) whose channel count k gives the closest
    parameter count to it, unless the variant (``parse_variant``) fixes k."""
    check_name("model", model_name, MODELS)
    kw = dict(size_options(task.name, size)[0], vocab_size=task.vocab_size, max_len=task.seq_len)
    kw["n_classes"] = task.n_classes if task.kind == "classify" else None
    if model_name == "transformer":
        return Transformer(**kw)
    rel = {k: v for k, v in kw.items() if k not in ("d_model", "d_mlp", "activation")}
    rel["d_gauge"] = D_GAUGE
    if variant is not None:
        rel.update(parse_variant(variant))
        if "n_channels" in rel:
            return RelationalTransformer(**rel)

    def count(module_fn, **extra):  # parameter count without allocating (meta device)
        with torch.device("meta"):
            return sum(p.numel() for p in module_fn(**extra).parameters())

    budget, h, best = count(Transformer, **kw), kw["n_heads"], None
    for k in range(h, 64 * kw["d_model"], h):  # the count grows with k: stop past the budget
        n = count(RelationalTransformer, n_channels=k, **rel)
        best = (k, n) if best is None or abs(n - budget) < abs(best[1] - budget) else best
        if n >= budget:
            break
    return RelationalTransformer(n_channels=best[0], **rel)
