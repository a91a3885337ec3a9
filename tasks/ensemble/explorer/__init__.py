"""The browser explorer of a trained ensemble surrogate (``python explore.py --run RUN``).

- :mod:`tasks.ensemble.explorer.view_model`: pure Python (no web framework): parameters in simulation units ->
  the model's slices and volume, the nearest training run, IDW-8, the true field and error of a stored run, the
  trust cue, downloads; input checking; :class:`~tasks.ensemble.explorer.view_model.Coalescer` (a newer request
  supersedes queued ones).
- :mod:`tasks.ensemble.explorer.app`: the Panel page over the view model (imports panel).
"""
from tasks.ensemble.explorer.view_model import Coalescer, ExplorerModel, InputError, RunRefused

__all__ = ["ExplorerModel", "InputError", "RunRefused", "Coalescer"]
