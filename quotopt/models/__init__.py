"""Models: a symmetry-laid-out baseline transformer and the relational (gauge-invariant) one."""

from .relational import RelationalConfig, RelationalTransformer
from .transformer import Transformer, TransformerConfig

__all__ = ["RelationalConfig", "RelationalTransformer", "Transformer", "TransformerConfig"]
