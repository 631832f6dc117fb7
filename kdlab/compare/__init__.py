"""``kdlab-compare``: compare finished runs without W&B (:mod:`kdlab.compare.cli`): runs are read
and aggregated by :mod:`kdlab.compare.runs` and plotted by :mod:`kdlab.compare.plots`."""

from kdlab.compare.cli import cli, compare
from kdlab.compare.runs import aggregate, group_keys, load_runs

__all__ = ["aggregate", "cli", "compare", "group_keys", "load_runs"]
