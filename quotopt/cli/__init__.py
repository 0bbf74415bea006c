"""The ``quotopt`` command line (``quotopt.cli.main:main``): ``train``, ``compare``,
``spectrum``, ``study`` and ``bench``. Thin: parse arguments, call ``quotopt.training``,
``quotopt.dynamics`` and ``quotopt.study``, write files and figures (``plots``, drawn with
``quotopt.plotting``)."""
