"""The reproducible study behind ``docs/results.md`` (``quotopt study``).

* ``protocol``: the quick, standard and full plans (tasks, sizes, budgets, optimisers, grids);
* ``tuning``: grids that grow until they bracket their best setting;
* ``robustness``: basin share, seeds at the target, spread over gauge-transformed starts;
* ``runner``: a process pool that runs and caches training runs;
* ``flat``: the flat-direction experiment;
* ``run``: ``run_study(plan, out)`` — tuning, seeds at the best settings, relational, flat;
* ``report`` / ``targets`` / ``summaries`` / ``figures``: the results page, its verdicts and
  its figures.
"""

from .protocol import FULL, PLANS, QUICK, STANDARD, StudyPlan, n_runs
from .report import write_report
from .run import run_study

__all__ = ["FULL", "PLANS", "QUICK", "STANDARD", "StudyPlan", "n_runs", "run_study", "write_report"]
