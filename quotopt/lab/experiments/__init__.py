"""Experiment settings of the flat-direction study: the models and tasks at whose refined
critical points flat directions are counted (``critical``, ``critical_settings``) and the
teacher regression (``teacher``); docs/theory/flat-directions.md derives what they measure."""
