"""Layouts: how a model's own parameters map to a bundle's point coordinates.

``Layout`` (``base``) is the contract: ``layout(tensors) -> point`` and one write-back,
``layout.write_back(params, point)``. ``ProjectionHeads`` (``projections``) covers the attention
heads and MLP units of every family by index; ``units`` and ``hf`` hold the older special cases.
"""

from .base import Layout, copy_into
from .compose import ComposedLayout
from .hf import Conv1DHeads, GroupedQueryKey, GroupedValueOutput, linear_rows_as_heads
from .lora import LoRAPairs
from .projections import MultiheadAttentionHeads, ProjectionHeads, Rows, feature_blocks
from .units import UnitsOfLinear, UnitsOfMatmul

__all__ = [
    "ComposedLayout",
    "Conv1DHeads",
    "GroupedQueryKey",
    "GroupedValueOutput",
    "Layout",
    "LoRAPairs",
    "MultiheadAttentionHeads",
    "ProjectionHeads",
    "Rows",
    "UnitsOfLinear",
    "UnitsOfMatmul",
    "copy_into",
    "feature_blocks",
    "linear_rows_as_heads",
]
