"""Model → param groups: which of a model's parameters carry which symmetry.

``symmetries(model)`` (``pipeline``) walks the detectors of ``registry`` over the model: the
groups a model declares (``declare`` has the helpers), then candidates proposed by structure
(``detectors``: ``torch.nn``, LoRA adapters, Hugging Face families; the shared types in
``candidates``), each verified before it is kept (``checks``, ``accept``) and reported
(``report``). Groups that share a tensor on disjoint entries compose (``compose``); ``layouts``
map a model's tensors to a bundle's point; ``joint`` holds the joint O(d) × GL(r) groups.
"""

from . import detectors  # noqa: F401  (registers the built-in detectors)
from .candidates import Option, Request, Slot
from .checks import gauge_transform, group_point, verify, write_point
from .detectors.hf_inputs import example_inputs
from .detectors.lora import LoRALinear, LoRARankWarning, add_lora, lora_pairs, orthonormal_start
from .joint import fold_rms_gains, joint_groups, llama_joint_groups
from .pipeline import describe, symmetries, use_geometry
from .registry import Detector, register, unregister
from .registry import detectors as registered
from .report import SymmetryReport

__all__ = [
    "Detector",
    "LoRALinear",
    "LoRARankWarning",
    "Option",
    "Request",
    "Slot",
    "SymmetryReport",
    "add_lora",
    "describe",
    "example_inputs",
    "fold_rms_gains",
    "gauge_transform",
    "group_point",
    "joint_groups",
    "llama_joint_groups",
    "lora_pairs",
    "orthonormal_start",
    "register",
    "registered",
    "symmetries",
    "unregister",
    "use_geometry",
    "verify",
    "write_point",
]
