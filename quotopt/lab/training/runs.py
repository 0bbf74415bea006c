"""A run's settings and its files: ``RunConfig``, the output directory, ``metrics.jsonl``,
``summary.json`` and ``checkpoint.pt``.

Every file is written atomically (a temporary sibling, then ``os.replace``); a failed write
removes its temporary file and surfaces as one ``OSError`` naming the file. A checkpoint holds
plain tensors and containers (``torch.load(path, weights_only=True)`` reads it): ``step``,
``config``, ``model``, ``optimizer``, ``data_rng``, ``torch_rng``, ``clock`` and ``threads``
(torch's CPU thread count, on which bit-exact resumption depends); ``load_checkpoint`` checks
the type and range of every field.

A run directory has one writer at a time: ``run_lock`` holds an exclusive ``flock`` on its
``.lock`` file, which the kernel releases when the owner exits or dies, so a second writer is
refused while the first lives and a dead owner leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .optimizers import default_hparams
from .registry import MODELS, TASK_DEFAULTS, check_name, default_size, parse_variant, size_options
from .schedule import SCHEDULES

#: files of one training run in its directory
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")
#: fields added to ``RunConfig`` after runs were saved, with the value those runs had
_LATER_DEFAULTS = {
    "variant": None,
    "schedule": "constant",
    "gauge_condition": None,
    "gauge_round_trip": False,
}
#: keys a checkpoint must hold to be resumed (``threads`` is checked where present)
CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "data_rng", "torch_rng", "clock")
#: seeds are integers in [0, MAX_SEED) (torch's generators take 64-bit seeds; the loop adds
#: small offsets to the seed, and numpy's generators take 32-bit ones)
MAX_SEED = 2**32
#: the lock file of a run directory (``run_lock``)
LOCK_FILE = ".lock"


@dataclasses.dataclass
class RunConfig:
    task: str
    model: str = "transformer"
    variant: str | None = None  # a relational configuration (registry.parse_variant)
    optim: str = "adamw"
    steps: int = 1000  # total optimiser steps (a resumed run continues up to this count)
    seed: int = 0  # task split, initialisation (global torch RNG) and batch order
    size: str | None = None  # None: the task's first size in SIZES
    lr: float | None = None  # None: the optimiser's default on the task
    weight_decay: float | None = None  # None: the optimiser's default on the task
    batch_size: int | None = None  # None: the task's default; 0: full batch
    eval_every: int | None = None  # None: the task's default
    eval_examples: int | None = None  # examples per evaluated split; None: the task's default
    device: str = "cpu"
    stop_at_target: bool = False  # end at the first evaluation that reaches the task's target
    schedule: str = "constant"  # learning-rate schedule (training.schedule.SCHEDULES)
    gauge_condition: float | None = None  # start from a gauge-transformed copy of the init
    gauge_round_trip: bool = False  # ... transformed by g then g⁻¹: the round-off control

    def resolved(self) -> RunConfig:
        """A copy with the defaults filled in; raises ``ValueError`` on bad names or numbers."""
        check_name("model", self.model, MODELS)
        size = self.size or default_size(self.task)
        size_options(self.task, size)
        lr, wd = default_hparams(self.optim, self.task)
        d = TASK_DEFAULTS[self.task]
        out = dataclasses.replace(
            self,
            size=size,
            lr=lr if self.lr is None else self.lr,
            weight_decay=wd if self.weight_decay is None else self.weight_decay,
            batch_size=d["batch_size"] if self.batch_size is None else self.batch_size,
            eval_every=self.eval_every or d["eval_every"],
            eval_examples=self.eval_examples or d["eval_examples"],
        )
        check_name("schedule", out.schedule, SCHEDULES)
        if out.variant is not None:
            if out.model != "relational":
                raise ValueError(
                    f"variant {out.variant!r} needs model 'relational', not {out.model!r}"
                )
            parse_variant(out.variant)
        gauge = out.gauge_condition
        if gauge is not None and not (math.isfinite(gauge) and gauge >= 1):
            raise ValueError(f"gauge_condition must be None or a finite number >= 1, got {gauge}")
        if out.gauge_round_trip and gauge is None:
            raise ValueError("gauge_round_trip needs a gauge_condition (the element to undo)")
        if _not_int(out.seed) or not 0 <= out.seed < MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {out.seed!r}")
        if out.steps < 1 or out.eval_every < 1 or out.batch_size < 0:
            raise ValueError(f"steps and eval_every must be positive, batch_size >= 0: {out}")
        finite = math.isfinite(out.lr) and math.isfinite(out.weight_decay)
        if not (finite and out.lr > 0 and out.weight_decay >= 0):
            raise ValueError(
                f"need a finite lr > 0 and weight_decay >= 0, got {out.lr}, {out.weight_decay}"
            )
        return out


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``; on any failure (a full disk, Ctrl-C) the
    temporary file is removed, and an ``OSError`` becomes one naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(f"cannot write {path}: {err.strerror or err}") from err
        raise


def write_json(path, obj) -> None:
    _atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n"))


def write_text(path, text: str) -> None:
    """Replace the text file ``path`` atomically."""
    _atomic(Path(path), lambda p: p.write_text(text))


def _torch_save(state: dict, path: Path) -> None:
    try:
        torch.save(state, path)
    except RuntimeError as err:  # torch's C++ writer reports a failed write as RuntimeError
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            f"torch.save failed with {free:,} bytes free on the file system (a full disk?)"
        ) from err


def save_checkpoint(path, state: dict) -> None:
    """Write the checkpoint ``state`` (the keys of ``CHECKPOINT_KEYS``) atomically."""
    _atomic(Path(path), lambda p: _torch_save(state, p))


def prepare_out(out_dir) -> Path:
    """Create ``out_dir`` and check that it is writable (``OSError`` otherwise)."""
    out = Path(out_dir)
    probe = out / ".write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        if out.is_dir():
            probe.unlink(missing_ok=True)
        raise OSError(f"cannot write to output directory {out}: {err.strerror or err}") from None
    return out


def claim_out(out_dir, *, resume: bool, force: bool, files: Iterable[str] = RUN_FILES) -> None:
    """Refuse to start afresh over a previous run in ``out_dir`` (any of ``files`` present)
    unless ``resume`` (continue it) or ``force`` (its files are deleted here) is given."""
    if resume and force:
        raise ValueError("--resume continues a run and --force replaces it: give one of them")
    out = Path(out_dir)
    found = [name for name in files if (out / name).exists()]
    if not found or resume:
        return
    if not force:
        raise ValueError(
            f"output directory {out} already holds a run ({', '.join(found)}); add --resume to "
            "continue it or --force to replace it"
        )
    for name in found:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path`` (``weights_only``); ``ValueError`` when missing, corrupt or
    lacking one of ``CHECKPOINT_KEYS``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({first})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    for key, rule in _FIELD_RULES.items():
        if (key in ckpt or key != "threads") and not _FIELD_CHECKS[key](ckpt.get(key)):
            shown = repr(ckpt.get(key))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(
                f"checkpoint {path} has {key} = {shown}, but {key} must be {rule}; the file was "
                "not written by a training run: start over with --force"
            )
    return ckpt


def _count(value, least: int) -> bool:
    return not _not_int(value) and value >= least


def _seconds(clock) -> bool:
    fields = [clock.get(k) for k in ("wall", "train")] if isinstance(clock, dict) else [None]
    numbers = [v for v in fields if not isinstance(v, bool) and isinstance(v, int | float)]
    return len(numbers) == len(fields) == 2 and all(math.isfinite(v) and v >= 0 for v in numbers)


def _rng_state(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


_FIELD_RULES = {
    "step": "an integer >= 0",
    "config": "a dict of run settings",
    "model": "a dict of tensors (a state_dict)",
    "optimizer": "a dict with 'state' and 'param_groups' (a state_dict)",
    "data_rng": "a 1-D uint8 tensor (a generator state)",
    "torch_rng": "a 1-D uint8 tensor (a generator state)",
    "clock": "a dict of finite seconds >= 0 under 'wall' and 'train'",
    "threads": "None or an integer >= 1",
}
_FIELD_CHECKS = {
    "step": lambda v: _count(v, 0),
    "config": lambda v: isinstance(v, dict),
    "model": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    "optimizer": lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(),
    "data_rng": _rng_state,
    "torch_rng": _rng_state,
    "clock": _seconds,
    "threads": lambda v: v is None or _count(v, 1),
}


@contextlib.contextmanager
def run_lock(out_dir) -> Iterator[Path]:
    """Hold the run directory ``out_dir`` (which must exist) for this process; a directory
    another live process holds raises ``ValueError`` naming it. Re-entrant within a process;
    the kernel drops the lock when its owner exits or is killed."""
    import fcntl  # POSIX; the study and the CLI run on Linux and macOS

    out = Path(out_dir).resolve()
    if out in _HELD:
        yield out
        return
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OSError(f"cannot open {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(
                f"run directory {out} is in use by another process (pid {owner}): one writer at "
                "a time; wait for that process to finish or stop it, then add --resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(out)
        try:
            yield out
        finally:
            _HELD.discard(out)
    finally:
        os.close(fd)  # releases the lock


#: run directories this process holds (``run_lock`` is re-entrant)
_HELD: set[Path] = set()


def check_resumable(ckpt: dict, cfg: RunConfig, path) -> None:
    """``ValueError`` unless ``ckpt`` is from a run with ``cfg``'s settings, not past its
    steps, and was written with this process's torch thread count (bit-exact resumption
    needs the same count: a different one changes the order of floating-point sums)."""
    saved = ckpt["config"]
    keys = ("task", "model", "optim", "seed", "size", "lr", "weight_decay", "batch_size")
    keys += ("variant", "schedule", "gauge_condition", "gauge_round_trip")
    default = _LATER_DEFAULTS  # checkpoints from before these fields existed
    diff = [
        f"{k}={saved.get(k, default.get(k))!r}, not {getattr(cfg, k)!r}"
        for k in keys
        if saved.get(k, default.get(k)) != getattr(cfg, k)
    ]
    if diff:
        raise ValueError(f"checkpoint {path} is from another run: {'; '.join(diff)}")
    if ckpt["step"] > cfg.steps:
        raise ValueError(f"checkpoint {path} is at step {ckpt['step']} > steps {cfg.steps}")
    threads, now = ckpt.get("threads"), torch.get_num_threads()
    if threads is not None and threads != now:
        raise ValueError(
            f"checkpoint {path} was written with {threads} torch threads and this process has "
            f"{now}: resume with --threads {threads} (another count is not bit-exact)"
        )


def read_records(out_dir) -> list[dict]:
    """The evaluation records in ``out_dir/metrics.jsonl`` (none if there is no log)."""
    log = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def append_record(out_dir, record: dict) -> None:
    """Append one evaluation record to ``out_dir/metrics.jsonl``."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err


def finished_summary(config: RunConfig, out_dir) -> dict | None:
    """The summary in ``out_dir/summary.json`` if that run finished with ``config``'s settings
    (so it can be reused instead of trained again), else None."""
    done = Path(out_dir) / "summary.json"
    if not done.is_file():
        return None
    summary = json.loads(done.read_text())
    saved = {**_LATER_DEFAULTS, **summary["config"]}  # a run from before a field existed
    return summary if saved == dataclasses.asdict(config.resolved()) else None
