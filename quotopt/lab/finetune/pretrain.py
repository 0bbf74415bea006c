"""The pretrained model of the fine-tuning task: a small LLaMA-style byte decoder trained on the
plays, cached on disk by a content hash of everything that determines it.

``PretrainConfig`` holds the architecture (a ``transformers.LlamaConfig``: byte vocabulary of
256, RMSNorm, rotary positions, SwiGLU MLP, untied embeddings), the data (the plays of
``quotopt.lab.tasks.chars`` as bytes, windows of ``seq_len``) and the training (AdamW at a constant
``lr`` after a linear warm-up, gradients clipped to norm 1, ``steps`` steps of ``batch_size``
windows, global seed ``seed`` for the initialisation and a ``torch.Generator`` seeded with it
for the batches).

``pretrained(config, cache_dir)`` returns the model in evaluation mode and a dict of facts
(``key``, ``path``, ``trained``: whether this call trained it, ``val_loss`` in nats per byte,
``seconds``). The cache directory is ``cache_dir / key``, where ``key`` is the first 16 hex
digits of the SHA-256 of the JSON of the configuration plus the SHA-256 of the training bytes;
no library version enters it. The directory holds ``model.safetensors`` (the state dict) and
``meta.json`` (the configuration and the pretraining's losses and time); it is written to a
temporary sibling and renamed, so a half-written cache is never read. Loading reads
safetensors only (no pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ByteCorpus, play_bytes

__all__ = ["PretrainConfig", "cache_key", "default_cache_dir", "lm_loss", "portable", "pretrained"]


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    hidden_size: int = 128  # model width
    layers: int = 4  # decoder blocks
    heads: int = 4  # attention heads (as many key-value heads: no grouping)
    intermediate_size: int = 344  # SwiGLU width (≈ 8/3 · hidden, LLaMA's ratio)
    seq_len: int = 128  # context length of pretraining and fine-tuning
    steps: int = 700  # AdamW steps
    batch_size: int = 16  # windows per step
    lr: float = 3e-3  # peak learning rate (constant after warm-up)
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW's decoupled decay
    seed: int = 0  # initialisation (global RNG) and batch order (a Generator)
    max_bytes: int | None = None  # only the first bytes of the plays (tiny test sizes)

    def llama(self):
        """The ``transformers.LlamaConfig`` of this model."""
        import transformers

        return transformers.LlamaConfig(
            vocab_size=ByteCorpus.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


def cache_key(config: PretrainConfig) -> str:
    """16 hex digits of SHA-256 over the configuration's JSON and the training bytes' digest."""
    text = play_bytes()[: config.max_bytes]
    blob = json.dumps(
        dict(config=dataclasses.asdict(config), data=hashlib.sha256(text).hexdigest()),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$QUOTOPT_CACHE`` or ``~/.cache/quotopt``, then ``pretrained``."""
    root = os.environ.get("QUOTOPT_CACHE") or Path.home() / ".cache" / "quotopt"
    return Path(root) / "pretrained"


def lm_loss(model, x, y) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) of ``model`` on windows ``x`` → ``y``."""
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, 256)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def mean_loss(model, x, y, batch_size: int = 32) -> float:
    """``lm_loss`` over the windows ``x`` → ``y`` in chunks (evaluation mode restored after)."""
    was_training = model.training
    model.eval()
    total = sum(
        lm_loss(model, a, b).item() * len(a)
        for a, b in zip(x.split(batch_size), y.split(batch_size))
    )
    model.train(was_training)
    return total / len(x)


def _train(config: PretrainConfig):
    import transformers

    torch.manual_seed(config.seed)
    model = transformers.LlamaForCausalLM(config.llama())
    data = ByteCorpus.plays(config.seq_len, config.max_bytes)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(
        model.parameters(), config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    warm = max(config.warmup, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    tic = time.perf_counter()
    for _ in range(config.steps):
        x, y = data.batch("train", config.batch_size, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - tic
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"pretraining diverged (loss {loss.item()}); lower lr={config.lr}")
    val = mean_loss(model, *data.eval_windows("val", 64))
    return model.eval(), dict(val_loss=val, train_loss=loss.item(), seconds=seconds)


def pretrained(config: PretrainConfig, cache_dir=None):
    """(model, facts) of ``config``: loaded from ``cache_dir / cache_key(config)`` when there,
    else trained and saved there (module docstring)."""
    import safetensors.torch
    import transformers

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(config)
    path = root / key
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        model = transformers.LlamaForCausalLM(config.llama())
        model.load_state_dict(safetensors.torch.load_file(path / "model.safetensors"))
        return model.eval(), dict(meta, key=key, path=str(path), trained=False)
    model, facts = _train(config)
    tmp = root / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, tmp / "model.safetensors")
        meta = dict(facts, config=dataclasses.asdict(config))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            f"cannot write the pretrained model to {path}: {err.strerror or err}"
        ) from err
    return model, dict(meta, key=key, path=str(path), trained=True)


def portable(facts: dict) -> dict:
    """``facts`` of ``pretrained`` without the cache directory's path, which names the machine
    (a study's results keep the cache key)."""
    return {k: v for k, v in facts.items() if k != "path"}
