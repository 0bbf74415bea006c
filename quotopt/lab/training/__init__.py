"""Training runs behind the ``quotopt`` command, in four modules by job:

* ``registry``: tasks at their sizes, the architectures;
* ``optimizers``: the optimiser registry every command uses (``OPTIMIZERS`` of
  ``OptimizerSpec`` entries, ``build_optimizer``, ``build_adapter_optimizer``, ``detect``);
* ``runs``: ``RunConfig`` and a run's files (``metrics.jsonl``, ``summary.json``, checkpoints),
  written atomically by one process at a time (``run_lock``);
* ``loop``: ``train`` (resumable, bit-exact, Ctrl-C safe, stops cleanly on divergence) and
  ``evaluate``.

Every public name of the four is importable from here.
"""

from .loop import Interrupted, attention_heads, evaluate, head_probes, summarise, train
from .optimizer_spec import Build, OptimizerSpec
from .optimizers import (
    OPTIMIZERS,
    build_adapter_optimizer,
    build_optimizer,
    default_hparams,
    detect,
    lookup_optimizer,
    optimizer_names,
    register_optimizer,
)
from .registry import (
    D_GAUGE,
    MODELS,
    SIZES,
    TASK_DEFAULTS,
    build_model,
    build_task,
    check_name,
    default_size,
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
    "Build",
    "CHECKPOINT_KEYS",
    "D_GAUGE",
    "Interrupted",
    "MAX_SEED",
    "MODELS",
    "OPTIMIZERS",
    "OptimizerSpec",
    "RUN_FILES",
    "RunConfig",
    "SIZES",
    "TASK_DEFAULTS",
    "append_record",
    "attention_heads",
    "build_adapter_optimizer",
    "build_model",
    "build_optimizer",
    "build_task",
    "check_name",
    "check_resumable",
    "claim_out",
    "default_hparams",
    "default_size",
    "detect",
    "evaluate",
    "finished_summary",
    "head_probes",
    "load_checkpoint",
    "lookup_optimizer",
    "optimizer_names",
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
