"""The built-in detectors, one per source of structure, registered in the order they are tried:
models that declare their own groups (``declared``), ``torch.nn``'s layers (``torch_nn``), LoRA
adapters (``lora``), Hugging Face families (``hf``, with ``mlp`` and ``heads``).
"""

from ..registry import Detector, register
from .declared import model_groups
from .hf import float64_fix, hf_slots
from .hf_inputs import example_inputs
from .lora import lora_slots, stack_adapters
from .torch_nn import torch_slots

__all__ = ["BUILT_IN"]

BUILT_IN = (
    Detector("model", model_groups, declares=True),
    Detector("torch.nn", torch_slots),
    Detector("lora", lora_slots, finish=stack_adapters),
    Detector("huggingface", hf_slots, example_inputs=example_inputs, float64_fix=float64_fix),
)

for _detector in BUILT_IN:
    register(_detector)
