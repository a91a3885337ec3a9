"""Tasks: what a run learns. A task supplies the model's program-set arguments, the loss of a batch and the
evaluation of a trained run; the one training loop (util/training.py) knows nothing else about them.

Importing the package registers every task type (kind ``task``); list each task module here.
"""
import tasks.ensemble.task  # noqa: F401  (registers "ensemble")
import tasks.image.task  # noqa: F401  (registers "image")
import tasks.moe_inr.task  # noqa: F401  (registers "moe_inr")
import tasks.nerf.task  # noqa: F401  (registers "nerf")
import tasks.terrain.task  # noqa: F401  (registers "terrain")
