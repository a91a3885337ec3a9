"""Surrogate models, registered under kind ``model``; importing this package registers them all.

One explicit import per model module (no star imports); add a line for each new model.
"""
from models import drrnet  # noqa: F401
from models import explorable_inr  # noqa: F401
from models import fainr  # noqa: F401
from models import kplanes  # noqa: F401
from models import moe_inr  # noqa: F401
from models import image  # noqa: F401
from models import terrain  # noqa: F401  (transinr, functa, huvr, huvr_siren)
from models import nerf  # noqa: F401
