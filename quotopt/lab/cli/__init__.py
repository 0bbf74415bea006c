"""The ``quotopt`` command line (``quotopt.lab.cli.main:main``): ``train``, ``compare``,
``spectrum``, ``study`` and ``bench``. Thin: parse arguments, call ``quotopt.lab.training``,
``quotopt.dynamics`` and ``quotopt.lab.study``, write files and figures (``plots``, drawn with
``quotopt.lab.plotting``)."""
