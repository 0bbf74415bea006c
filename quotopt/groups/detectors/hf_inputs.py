r"""Inputs for one forward of a Hugging Face model, built from its config.

``quotopt.symmetries`` records the call each detected module receives in one forward of the model
and verifies the module's candidates on it (``docs/guides/hf.md``); without a forward that runs,
nothing detected can be verified. ``example_inputs(model)`` builds that forward's inputs from what
the model states about itself — its ``main_input_name``, the arguments its ``forward`` accepts and
its config — without importing ``transformers``:

* token ids (``input_ids``) below the text config's vocabulary size; decoder ids for
  encoder–decoders;
* images (``pixel_values``, (B, channels, size, size)) at the vision config's ``image_size``;
* mel features (``input_features``, (B, bins, 2·max_source_positions)), as Whisper reads them;
* raw audio (``input_values``, (B, samples)) long enough for the convolutional feature encoder
  (``conv_kernel``, ``conv_stride``) to give ``length`` frames: wav2vec2, HuBERT, WavLM;
* dual encoders (a text and a vision config, no image token: CLIP, SigLIP) get both token ids and
  pixels — one tower alone does not run their forward. A model that interleaves image tokens in
  its text (LLaVA and its kind) gets token ids only.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["example_inputs"]

IMAGE_TOKENS = ("image_token_id", "image_token_index")


def _size(value, default: int) -> int:
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value if isinstance(value, int) and value > 0 else default


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name`` (as a parameter or through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _samples(config, frames: int) -> int | None:
    """Samples a convolutional feature encoder needs to give ``frames`` frames, or None."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        return None
    n = frames
    for k, s in zip(reversed(kernels), reversed(strides)):
        n = (n - 1) * s + k
    return n


def _dual_encoder(config) -> bool:
    has_towers = all(getattr(config, c, None) is not None for c in ("text_config", "vision_config"))
    return has_towers and not any(getattr(config, t, None) is not None for t in IMAGE_TOKENS)


def example_inputs(model: nn.Module, batch: int = 2, length: int = 8):
    """``(args, kwargs)`` for one forward of a Hugging Face model, from its config (see the
    module docstring); None if it is not one or its main input is of a kind not listed there."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        return None
    gen = torch.Generator().manual_seed(0)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or 16
    vision = getattr(config, "vision_config", None) or config

    def ids(n):
        return torch.randint(0, min(vocab, 1000), (batch, n), generator=gen)

    def pixels():
        size = _size(getattr(vision, "image_size", None), 32)
        channels = _size(getattr(vision, "num_channels", None), 3)
        return torch.randn(batch, channels, size, size, generator=gen)

    if main == "input_ids":
        kwargs = {"input_ids": ids(length)}
        if _dual_encoder(config) and _accepts(model, "pixel_values"):
            kwargs["pixel_values"] = pixels()
    elif main == "pixel_values":
        kwargs = {"pixel_values": pixels()}
    elif main == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 16)
        bins = getattr(config, "num_mel_bins", 80)
        kwargs = {"input_features": torch.randn(batch, bins, frames, generator=gen)}
    elif main == "input_values" and _samples(config, length) is not None:
        kwargs = {"input_values": torch.randn(batch, _samples(config, length), generator=gen)}
    else:
        return None
    dtype = next(model.parameters()).dtype
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids(length - 2)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return (), kwargs
