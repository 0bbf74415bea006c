"""The ``quotopt`` command line (``quotopt.cli.main:main``): ``train``, ``compare``,
``spectrum`` and ``bench``. Thin: parse arguments, call ``quotopt.training`` and
``quotopt.dynamics``, write files and plots (``plots``, matplotlib's Agg backend)."""
