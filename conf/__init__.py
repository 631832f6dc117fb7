# kdlab's Hydra configs. This file makes the folder the package ``kdlab.conf`` in the wheel
# (pyproject.toml maps conf/ into the package); kdlab/util/config.py finds it.
