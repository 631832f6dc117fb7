"""kdlab's Hydra launcher: ``hydra/launcher=packed`` (see :mod:`kdlab.packed`)."""
