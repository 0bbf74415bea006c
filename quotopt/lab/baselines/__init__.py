"""Baselines for comparison with the quotient optimisers.

Each factory has the signature ``factory(model, lr, weight_decay, betas)`` and returns a
``torch.optim.Optimizer``; some first change the model in place, as their docstrings say.

* ``grokfast`` — AdamW on Grokfast-EMA filtered gradients (``GrokfastAdamW``): Lee, Kang, Kim,
  Lee & Kim, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients", arXiv:2405.20233.
* ``gauge_fixed_adamw`` — each head's GL(r) fixed by W_Q[:r] = W_V[:r] = I
  (``fix_head_gauge``), then AdamW on the remaining coordinates (``GaugeFixedAdamW``); the
  per-head form of Karbevski–Mijoski 2025, arXiv:2510.23912.
* ``random_bias_adamw`` — fixed random query and value biases (``add_random_biases``), then
  AdamW: Silverstein–Kunin–Shyam 2026, "Symmetry Breaking in Transformers for Efficient and
  Interpretable Training", arXiv:2601.22257.
* ``lora_plus`` — AdamW on LoRA adapters with η_B = λ·η_A: Hayou, Ghosh & Yu, "LoRA+:
  Efficient Low Rank Adaptation of Large Models", ICML 2024 (keyword ``ratio``).
* ``lora_rite`` — LoRA-RITE (``LoRARITE``): a transformation-invariant Adam on LoRA adapters,
  with an r×r second moment in the frame of the other factor: Yen et al., "LoRA Done RITE:
  Robust Invariant Transformation Equilibration for LoRA Optimization", ICLR 2025.
* ``geoopt_stiefel_adam`` — W_Q, W_K, W_V on the Stiefel manifold (``stiefel_heads``) with
  geoopt's ``RiemannianAdam`` (Bécigneul & Ganea, "Riemannian Adaptive Optimization Methods",
  arXiv:1810.00760); a constrained model, not a quotient. Needs geoopt.
"""

from .gauge_fixing import GaugeFixedAdamW, fix_head_gauge, gauge_fixed_adamw
from .grokfast import GrokfastAdamW, grokfast
from .lora_rite import LoRARITE, lora_rite
from .loraplus import lora_plus
from .muon import MuonWithAdamW, muon_adamw, quotient_muon_adamw
from .random_bias import add_random_biases, random_bias_adamw
from .stiefel import geoopt_stiefel_adam, stiefel_heads

__all__ = [
    "GaugeFixedAdamW",
    "GrokfastAdamW",
    "LoRARITE",
    "MuonWithAdamW",
    "add_random_biases",
    "fix_head_gauge",
    "gauge_fixed_adamw",
    "geoopt_stiefel_adam",
    "grokfast",
    "lora_plus",
    "lora_rite",
    "muon_adamw",
    "quotient_muon_adamw",
    "random_bias_adamw",
    "stiefel_heads",
]
