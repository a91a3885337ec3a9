"""Shared building blocks of the field models: one home for each.

Import from the submodules (this package imports nothing itself, so ``models.fast_ops`` can use
:mod:`models.components.mlp` without an import cycle):

    grids      dense and multi-resolution grids (+ structural super-resolution), feature planes, condition
               lines, exact line interpolation, per-axis size expansion, uniformly initialised parameters
    encodings  sin/cos positional encodings (DRR feature upsampling, NeRF-style coordinate encoding) and the
               multiresolution hash grid (Instant-NGP, tiny-cuda-nn formulas)
    refiners   RMSNorm, GLU block, GLU refiner (appendix B.1 of the DRR paper)
    mlp        ReLU MLPs (biased with the baselines' inits; bias-free Xavier-uniform as tcnn's FullyFusedMLP),
               DRR-Net's decoder wrapper, output activations and output-bias initialisation
    siren      sine-activated MLPs with the SIREN init and FA-INR's encoder variants
    flat       the reference baselines' per-point input u = [x, c] and their FieldModel base (FlatInputModel)
    lattice    the DRR spatial lattice shared by DRR-Net and the DRR image models: SSR + PE + GLU refinement
               of dense grids, sparse refinement, the fused CPU pipeline, baking and folding a linear layer in

Shapes use named dims: ``B`` batch entries, ``N`` points per entry, ``d`` spatial dims, ``P`` lattice vertices,
``C`` channels, ``L`` levels. Spatial shapes are in array order ``(D, H, W)`` / ``(H, W)``; coordinates follow
``docs/design.md`` (column 0 = last array axis, [-1, 1], align_corners).
"""
