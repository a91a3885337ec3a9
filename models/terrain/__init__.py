"""Amortized terrain INRs (spec huvr): TransINR, Functa, HUVR, HUVR+SIREN, and payload quantization."""
from models.terrain import functa, huvr, transinr  # noqa: F401  (register the model types)
