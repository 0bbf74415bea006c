"""The reproducible study behind ``docs/results.md`` (``quotopt study``).

* ``protocol``: the quick and full plans (tasks, sizes, budgets, optimisers, grids);
* ``runner``: a process pool that runs and caches training runs;
* ``flat``: the flat-direction experiment;
* ``run``: ``run_study(plan, out)`` — tuning, seeds at the best settings, relational, flat;
* ``report`` / ``figures``: the results page and its figures.
"""

from .protocol import FULL, PLANS, QUICK, StudyPlan, n_runs
from .report import write_report
from .run import run_study

__all__ = ["FULL", "PLANS", "QUICK", "StudyPlan", "n_runs", "run_study", "write_report"]
