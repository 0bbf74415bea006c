"""Layouts: how a model's own parameters map to a bundle's point coordinates.

``Layout`` (``base``) is the contract: ``layout(tensors) -> point`` and one write-back,
``layout.write_back(params, point)``. ``ProjectionHeads`` (``projections``) covers the attention
heads and MLP units of every family by index; ``units`` holds two-layer MLP special
cases, ``lora`` adapter pairs, ``compose`` the products of layouts on shared tensors.
"""

from .base import Layout, copy_into
from .compose import ComposedLayout
from .lora import LoRAPairs
from .projections import MultiheadAttentionHeads, ProjectionHeads, Rows, feature_blocks
from .units import UnitsOfLinear, UnitsOfMatmul

__all__ = [
    "ComposedLayout",
    "Layout",
    "LoRAPairs",
    "MultiheadAttentionHeads",
    "ProjectionHeads",
    "Rows",
    "UnitsOfLinear",
    "UnitsOfMatmul",
    "copy_into",
    "feature_blocks",
]
