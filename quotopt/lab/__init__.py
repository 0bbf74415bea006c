"""The laboratory: what the ``quotopt`` command runs on top of the library.

Training runs (``training``) on the project's tasks (``tasks``), the benchmark study
(``study``), LoRA fine-tuning (``finetune``), the quantisation-gauge study (``gauge_study``),
the baselines the quotient optimisers are compared with (``baselines``), the flat-direction
experiments (``experiments``), figures (``plotting``) and the command line (``cli``).

The laboratory depends on the library (``quotopt.symmetries``, ``quotopt.optim``, ``manifolds``,
``quotopt.models``, ``quotopt.dynamics``, ``quotopt.gauge``), never the reverse:
``tests/test_layout.py`` checks it.
"""
