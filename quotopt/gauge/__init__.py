"""Choosing the representative of a model in which it quantises best (see quotopt.gauge.fibre)."""
