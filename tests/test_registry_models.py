"""Every registered model, generated from the registry (``names("model")``): forward shape, backward (every
trainable parameter gets a finite gradient), baked output equal to unbaked, state-dict round trip.

A model registered tomorrow is tested here without anyone listing it. Its tiny constructor arguments come from
its signature: the defaults, plus the family's tiny sizes below (a table keyed by base class; each key is used
only where the model's signature accepts it), plus a value for each required argument in ``REQUIRED``.
``test_every_model_builds_tiny`` fails, naming the model, when a model cannot be built that way or is too large
to test quickly: then add the missing key to its family's table (or a family for a new base class).
A model whose plain forward leaves some parameters without a gradient by design is declared in ``TRAINING_CALL``
with the reason and the call that trains them; nothing is skipped silently.
"""
import inspect

import pytest
import torch

from models.base import FieldModel
from util.registry import accepted_keys, build, get, names

MODELS = [n for n in names("model") if not n.startswith("_")]  # "_name": registered by a test module
MAX_PARAMS = 60_000  # a tiny model stays below this; a larger one would make the file slow

# Values for arguments without a default (program-injected: read from the data by the task).
REQUIRED = {"cond_dim": 2}

# Tiny sizes per family, keyed by base-class name (first match in the MRO wins). A key is passed only to models
# whose signature has it, so one table serves every model of the family.
FAMILY_TINY = {
    # amortized terrain INRs (models/terrain/): tiles (B, 1, 16, 16)
    "AmortizedTerrainINR": dict(
        tile_size=16, spatial_dims=2, patch_size=4, latent_dim=6, enc_width=16, enc_depth=1, enc_heads=2, dec_width=16,
        dec_depth=1, dec_heads=2, mlp_width=8, mlp_depth=2, upsampler_channels=4, siren_width=8, width=16, depth=1,
        heads=2, weight_groups=[4, 2, 1], hidden_layers=1, inner_steps=1),
    # NeRF radiance fields (models/nerf.py): model(x, c, d) -> (B, N, 4)
    "RadianceField": dict(
        resolution=5, resolutions=[4, 6], channels=2, refiner_layers=1, hidden_mult=2.0, mlp_width=8,
        geo_features=3, color_width=8, color_hidden_layers=1, levels=2, features_per_level=2, log2_hashmap_size=6,
        base_resolution=4, max_resolution=8, width=16, depth=2, skip_layer=1, pos_freqs=2, dir_freqs=1,
        bake_chunk=4096),
    # image fields (models/image.py): single 2D field with 3 channels
    "ImageField": dict(
        resolution=6, resolutions=[4, 6], channels=2, ssr_resolution=8, pe_frequencies=1, refiner_layers=1,
        hidden_mult=1.5, decoder_width=8, decoder_hidden_layers=1, levels=2, features_per_level=2,
        log2_hashmap_size=6, base_resolution=4, max_resolution=16, width=16, hidden_layers=1, bake_chunk=4096),
    # every other field model: the conditional ensemble fields (DRR-Net, baselines) and MoE-INR
    "FieldModel": dict(
        # DRR-Net
        spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2, spatial_refiner_layers=1,
        spatial_hidden_mult=1.5, cond_resolutions=[2, 3], cond_channels=2, cond_refiner_layers=1,
        cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2, init_output_mean=0.5,
        # K-Planes, Explorable-INR, FA-INR
        spatial_resolution=4, cond_resolution=5, feature_dim=4, multiscale=(1, 2), decoder_width=16,
        grid_size=4, plane_size=6, line_size=4, grid_features=4, plane_features=4, line_features=4,
        cond_hidden_dims=4, num_entries=16, feature_dim_3d=4, feature_dim_1d=4, top_k=4, num_hidden_layers=1,
        mlp_encoder_dim=16, mlp_hidden_dim=16, n_experts=3, manager_res=4, manager_features=4, adapter_width=8,
        # MoE-INR
        M=4, k=3),
}

# Models whose ordinary forward leaves some parameters without a gradient by design, with the reason and the
# call that trains them (the backward test then checks that call gives every parameter a gradient).
TRAINING_CALL = {
    "moe_inr": ("hard top-1 routing (argmax) gives the policy and the unchosen experts no gradient; the task "
                "trains through forward(all_experts=True), which scores every expert",
                lambda m, x, c: torch.cat([v.reshape(*x.shape[:2], -1)
                                           for v in m(x, c, all_experts=True).values()], -1)),
}


def family(cls) -> str:
    for base in cls.__mro__:
        if base.__name__ in FAMILY_TINY:
            return base.__name__
    raise LookupError(f"{cls.__name__} is not a FieldModel")


def tiny_kwargs(name):
    cls = get("model", name)
    keys = accepted_keys("model", name)
    kw = {k: v for k, v in FAMILY_TINY[family(cls)].items() if k in keys}
    for k, default in keys.items():
        if default is inspect.Parameter.empty and k not in kw:
            if k not in REQUIRED:
                raise LookupError(f"model '{name}': no value for its required argument '{k}'; add it to REQUIRED")
            kw[k] = REQUIRED[k]
    return kw


def make(name, seed=0):
    torch.manual_seed(seed)
    kw = tiny_kwargs(name)
    return build("model", name, section="model", **kw), kw


class Case:
    """A built tiny model, its inputs and how to call it (by family)."""

    def __init__(self, name, seed=0):
        self.name = name
        self.model, self.kw = make(name, seed)
        self.family = family(type(self.model))
        keys = accepted_keys("model", name)
        g = torch.Generator().manual_seed(1)
        B, N = 2, 9
        if self.family == "AmortizedTerrainINR":
            T = self.kw["tile_size"]
            self.tiles = torch.rand(B, 1, T, T, generator=g)
            self.x = torch.rand(B, N, 2, generator=g) * 2 - 1
            self.channels = 1
        elif self.family == "RadianceField":
            self.x = torch.rand(B, N, 3, generator=g) * 2 - 1
            self.c = torch.zeros(B, 0)
            d = torch.randn(B, N, 3, generator=g)
            self.d = d / d.norm(dim=-1, keepdim=True)
            self.channels = 4
        else:
            dims = self.kw.get("spatial_dims", keys.get("spatial_dims"))
            cond = self.kw.get("cond_dim", keys.get("cond_dim", 0))
            self.x = torch.rand(B, N, dims, generator=g) * 2 - 1
            self.c = torch.rand(B, cond, generator=g)
            self.channels = self.kw.get("out_dim", keys.get("out_dim", 1))

    def payload(self, model):
        return model.encode(self.tiles).reshape(self.tiles.shape[0], -1)

    def forward(self, model):
        """The query call: (B, N, C)."""
        if self.family == "AmortizedTerrainINR":
            return model(self.x, self.payload(model))
        if self.family == "RadianceField":
            return model(self.x, self.c, self.d)
        return model(self.x, self.c)

    def training_loss(self, model):
        """A scalar through the call the model's task trains with (all outputs involved)."""
        if self.family == "AmortizedTerrainINR":
            recon, terms = model(tiles=self.tiles)
            return (recon - self.tiles).square().mean() + sum(v.float() for v in terms.values())
        if self.family == "RadianceField":
            model.begin_step(0)
        if self.name in TRAINING_CALL:
            out = TRAINING_CALL[self.name][1](model, self.x, self.c)
        else:
            out = self.forward(model)
        w = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)  # no symmetric cancellation
        return (w * out).square().mean()


# --------------------------------------------------------------------------------------------------- coverage
def test_registry_has_models():
    assert len(MODELS) >= 20, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_tiny(name):
    cls = get("model", name)
    assert inspect.isclass(cls) and issubclass(cls, FieldModel), \
        f"model '{name}' must subclass models.base.FieldModel (docs/design.md, Models)"
    try:
        model, kw = make(name)
    except Exception as e:  # noqa: BLE001 - the message says how to fix the table
        raise AssertionError(f"model '{name}' ({family(cls)} family) cannot be built tiny with {tiny_kwargs(name)}: "
                             f"{type(e).__name__}: {e}. Add keys to FAMILY_TINY['{family(cls)}'] in this file") from e
    n = sum(p.numel() for p in model.parameters())
    assert n <= MAX_PARAMS, (f"model '{name}' has {n} parameters with {kw}; add tiny sizes for its large arguments "
                             f"to FAMILY_TINY['{family(cls)}'] (limit {MAX_PARAMS})")
    assert n > 0


# -------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape(name):
    case = Case(name)
    case.model.train()
    out = case.forward(case.model)
    B, N = case.x.shape[:2]
    assert tuple(out.shape) == (B, N, case.channels), f"{name}: {tuple(out.shape)}"
    assert torch.isfinite(out).all()
    case.model.eval()
    with torch.no_grad():
        out_eval = case.forward(case.model)
    assert tuple(out_eval.shape) == (B, N, case.channels)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    case = Case(name)
    model = case.model.train()
    loss = case.training_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameter"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient for {bad}"
    # the loss reaches the weights at all (not every gradient zero)
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("name", [n for n in MODELS if n in TRAINING_CALL])
def test_declared_partial_gradients_are_partial_for_the_stated_reason(name):
    # the plain forward really leaves some parameters without a gradient (else the declaration is stale)
    case = Case(name)
    model = case.model.train()
    out = case.forward(model)
    (out.square().mean()).backward()
    assert any(p.grad is None for p in model.parameters() if p.requires_grad), \
        f"{name}: every parameter gets a gradient from forward(); drop its TRAINING_CALL entry"


@pytest.mark.parametrize("name", MODELS)
def test_baked_output_equals_unbaked(name):
    case = Case(name)
    model = case.model
    # a few training steps' worth of non-trivial weights, so baked caches are not all-constant
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval()
    with torch.no_grad():
        plain = case.forward(model)
        model.bake()
        assert model.is_baked and not model.training
        baked = case.forward(model)
        model.unbake()
        assert not model.is_baked
        again = case.forward(model)
    torch.testing.assert_close(baked, plain, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} baked vs plain: {m}")
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    model.bake()
    model.train()
    assert not model.is_baked, f"{name}: train() must unbake"


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    case = Case(name, seed=0)
    fresh = Case(name, seed=123).model
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(0.05)
    sd = case.model.state_dict()
    fresh.load_state_dict(sd)  # strict: same keys
    case.model.eval()
    fresh.eval()
    with torch.no_grad():
        want = case.forward(case.model)
        got = case.forward(fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and the weights themselves (a state dict that forgets an unused-at-eval tensor would pass the line above)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), f"{name}: {k} differs after load_state_dict"


def _condition(case, model):
    """The condition of the first field, (1, d_c): the payload of the first tile for the terrain models."""
    if case.family == "AmortizedTerrainINR":
        return model.encode(case.tiles[:1]).reshape(1, -1)
    return case.c[:1]


@pytest.mark.parametrize("name", MODELS)
def test_predict_grid_equals_forward_on_the_lattice(name):
    from util.sampling import grid_coords

    case = Case(name)
    model = case.model.eval()
    dims = case.x.shape[-1]
    with torch.no_grad():
        c = _condition(case, model)
        # a lattice of 2 per axis (every vertex on a grid's vertex), an odd mixed one, and 6 per axis
        for shape in ([2] * dims, [3, 4, 5, 3][:dims], [6] * dims):
            want = model(grid_coords(shape)[None], c)[0]
            for baked in (False, True):
                if baked:
                    model.bake()
                got = model.predict_grid(shape, c[0], chunk_size=37).reshape(-1, want.shape[-1])
                model.unbake()
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{name} {shape} baked={baked}: {m}")


@pytest.mark.parametrize("name", [n for n in MODELS if "fast_paths" in accepted_keys("model", n)])
def test_fast_paths_equal_the_plain_path(name):
    case = Case(name)
    torch.manual_seed(0)
    plain = build("model", name, section="model", **{**case.kw, "fast_paths": False})
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plain.load_state_dict(case.model.state_dict())
    assert case.model.fast_paths and not plain.fast_paths
    for train in (True, False):
        case.model.train(train)
        plain.train(train)
        fast_out, plain_out = case.forward(case.model), case.forward(plain)
        torch.testing.assert_close(fast_out, plain_out, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} train={train}: {m}")
        # and the same gradients
        if train:
            g_fast = torch.autograd.grad(fast_out.square().sum(), list(case.model.parameters()), allow_unused=True)
            g_plain = torch.autograd.grad(plain_out.square().sum(), list(plain.parameters()), allow_unused=True)
            for (n, _), a, b in zip(case.model.named_parameters(), g_fast, g_plain):
                assert (a is None) == (b is None), f"{name}: {n} gets a gradient on one path only"
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name} grad {n}: {m}")
