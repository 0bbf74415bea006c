"""Choosing the representative of a model's orbit in which it quantises best.

A LLaMA-family model with its RMSNorm gains folded computes the same function on a whole orbit
of weights (``fibre``); ``search`` optimises over the group elements for an objective of the
moved weights (``objectives``: weight error, outlier measures, the end-to-end loss of the model
fake-quantised by ``quantisers``); ``represent`` writes the exact representative and checks it
in float64; ``methods`` names the compared gauges (QuaRot-, SpinQuant-, FlatQuant-style and
quotopt's). Guide: docs/guides/quantise.md.
"""

from .represent import GaugeReport, quantise_gauge

__all__ = ["GaugeReport", "quantise_gauge"]
