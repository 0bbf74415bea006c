"""LoRA fine-tuning on the quotient, end to end (``quotopt finetune``).

A small LLaMA-style byte decoder pretrained on the plays (``pretrain``, cached by a content
hash), LoRA adapters on q/k/v/o fine-tuned on the Python standard library's source or on the
language reference's English prose (``data``, ``run``) with the adapter optimisers of the registry
(``quotopt.lab.training.optimizers``),
tuned and seeded by ``protocol``, reported by ``report``. See ``docs/guides/finetune-peft.md``.
"""

from .data import (
    STDLIB_MODULES,
    TASKS,
    VAL_FRACTION,
    ByteCorpus,
    play_bytes,
    prose_corpus,
    stdlib_corpus,
)
from .pretrain import PretrainConfig, cache_key, default_cache_dir, lm_loss, pretrained
from .protocol import run_dir, study, tune
from .report import figures, median_curve, report, steps_to
from .run import TARGETS, FinetuneConfig, add_adapters, finetune, finished

__all__ = [
    "STDLIB_MODULES",
    "TARGETS",
    "TASKS",
    "VAL_FRACTION",
    "ByteCorpus",
    "FinetuneConfig",
    "PretrainConfig",
    "add_adapters",
    "cache_key",
    "default_cache_dir",
    "figures",
    "finetune",
    "finished",
    "lm_loss",
    "median_curve",
    "play_bytes",
    "pretrained",
    "prose_corpus",
    "report",
    "run_dir",
    "stdlib_corpus",
    "steps_to",
    "study",
    "tune",
]
