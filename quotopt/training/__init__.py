"""Training runs behind the ``quotopt`` command, in three modules by job:

* ``registry``: tasks at their sizes, the architectures, optimisers by name
  (``register_optimizer``, ``build_optimizer``);
* ``runs``: ``RunConfig`` and a run's files (``metrics.jsonl``, ``summary.json``, checkpoints),
  written atomically by one process at a time (``run_lock``);
* ``loop``: ``train`` (resumable, bit-exact, Ctrl-C safe, stops cleanly on divergence) and
  ``evaluate``.

Every public name of the three is importable from here.
"""

from .loop import Interrupted, attention_heads, evaluate, summarise, train
from .registry import (
    D_GAUGE,
    HPARAMS,
    MODELS,
    OPTIMIZERS,
    SIZES,
    TASK_DEFAULTS,
    Factory,
    build_model,
    build_optimizer,
    build_task,
    check_name,
    default_hparams,
    default_size,
    register_optimizer,
    size_options,
)
from .runs import (
    CHECKPOINT_KEYS,
    MAX_SEED,
    RUN_FILES,
    RunConfig,
    append_record,
    check_resumable,
    claim_out,
    finished_summary,
    load_checkpoint,
    prepare_out,
    read_records,
    run_lock,
    save_checkpoint,
    write_json,
    write_text,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "D_GAUGE",
    "HPARAMS",
    "MAX_SEED",
    "MODELS",
    "OPTIMIZERS",
    "RUN_FILES",
    "SIZES",
    "TASK_DEFAULTS",
    "Factory",
    "Interrupted",
    "RunConfig",
    "append_record",
    "attention_heads",
    "build_model",
    "build_optimizer",
    "build_task",
    "check_name",
    "check_resumable",
    "claim_out",
    "default_hparams",
    "default_size",
    "evaluate",
    "finished_summary",
    "load_checkpoint",
    "prepare_out",
    "read_records",
    "register_optimizer",
    "run_lock",
    "save_checkpoint",
    "size_options",
    "summarise",
    "train",
    "write_json",
    "write_text",
]
