"""MoE-INR model (models/moe_inr.py): Eq. 1 parameter counts, Table 2 shares, top-1 routing with a spy on the
experts, average mode, config errors."""
import numpy as np
import pytest
import torch

from models.moe_inr import MoEINR, moe_param_count
from util.registry import ConfigError, build


def eq1(M, k):
    return 77 * M * M + 35 * M + 17 * M * k + 2 * k


@pytest.mark.parametrize("M,k", [(1, 1), (3, 2), (8, 3), (16, 7), (87, 7), (5, 9)])
def test_parameter_count_is_eq1(M, k):
    model = MoEINR(M=M, k=k)
    n = sum(p.numel() for p in model.parameters())
    assert n == eq1(M, k)
    assert moe_param_count(M, k) == eq1(M, k)


def test_table2_shares_and_vortex_size():
    model = MoEINR(M=87, k=7)
    assert sum(p.numel() for p in model.parameters()) == 596_225
    s = model.param_shares()
    assert round(100 * s["encoder"], 2) == 96.90
    assert round(100 * s["experts"], 2) == 0.82
    assert round(100 * s["policy"], 2) == 2.28
    # spec 6: vortex 256^3 x 90 float32 / fp16 weights = CR 5,065
    assert round(256 ** 3 * 90 * 4 / (596_225 * 2)) == 5065


def _diverse(model):
    with torch.no_grad():
        model.policy_out.weight.normal_(0, 1.0)
    return model


def test_top1_calls_only_the_argmax_expert():
    torch.manual_seed(0)
    model = _diverse(MoEINR(M=4, k=5)).eval()
    x = torch.rand(2, 300, 4) * 2 - 1
    c = torch.zeros(2, 0)
    seen = {j: [] for j in range(model.k)}
    for j, ex in enumerate(model.experts):
        ex.register_forward_hook(lambda m, inp, out, j=j: seen[j].append(inp[0].shape[0]))
    with torch.no_grad():
        y = model(x, c)
        allo = model.forward_all(x, c)
    choice = allo["logits"].argmax(-1).reshape(-1)
    counts = torch.bincount(choice, minlength=model.k)
    assert (counts > 0).sum() >= 2, "test needs a routing that uses several experts"
    for j in range(model.k):
        # each expert is called at most once, on exactly the coordinates routed to it; never when none are
        assert seen[j] == ([int(counts[j])] if counts[j] else [])
    want = allo["values"].reshape(-1, model.k)[torch.arange(choice.numel()), choice]
    torch.testing.assert_close(y.reshape(-1), want, rtol=1e-5, atol=1e-6)
    # the output differs from any single expert and from the mean (routing matters)
    assert not torch.allclose(y.reshape(-1), allo["values"].reshape(-1, model.k).mean(-1), atol=1e-4)
    assert torch.equal(model.route(x, c).reshape(-1), choice)


def test_average_mode_mean_and_variance():
    torch.manual_seed(1)
    model = _diverse(MoEINR(M=4, k=4, mode="average"))
    x = torch.rand(1, 50, 4) * 2 - 1
    c = torch.zeros(1, 0)
    with torch.no_grad():
        vals = model.forward_all(x, c)["values"].numpy()[0].astype(np.float64)
        mean, var = model.mean_var(x, c)
        y = model(x, c)
    np.testing.assert_allclose(mean[0, :, 0].numpy(), vals.mean(-1), atol=1e-5)
    np.testing.assert_allclose(var[0, :, 0].numpy(), vals.var(-1), atol=1e-5)
    torch.testing.assert_close(y, mean)
    top2 = MoEINR(M=4, k=4, mode="average", average_experts=2)
    top2.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = top2.forward_all(x, c)
        m2, v2 = top2.mean_var(x, c)
    idx = out["logits"][0].argsort(-1, descending=True)[:, :2].numpy()
    pick = np.take_along_axis(vals, idx, -1)
    np.testing.assert_allclose(m2[0, :, 0].numpy(), pick.mean(-1), atol=1e-5)
    np.testing.assert_allclose(v2[0, :, 0].numpy(), pick.var(-1), atol=1e-5)


def test_training_path_gradients_reach_every_part():
    model = MoEINR(M=3, k=2)
    out = model.forward_all(torch.rand(1, 20, 4), torch.zeros(1, 0))
    (out["values"].sum() + out["logits"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_registry_and_config_errors():
    m = build("model", "moe_inr", injected={"cond_dim": 0, "spatial_dims": 4}, M=2, k=3)
    assert isinstance(m, MoEINR)
    with pytest.raises(ConfigError, match="model.mode"):
        MoEINR(M=2, k=2, mode="soft")
    with pytest.raises(ConfigError, match="model.average_experts"):
        MoEINR(M=2, k=3, average_experts=1)
    with pytest.raises(ConfigError, match="model.M"):
        MoEINR(M=0)
    with pytest.raises(ValueError, match="coordinate columns"):
        MoEINR(M=2, k=2)(torch.rand(1, 3, 3), torch.zeros(1, 0))


def test_init_output_mean_sets_expert_biases():
    m = MoEINR(M=2, k=3, init_output_mean=-0.8)
    assert all(float(ex.bias) == pytest.approx(-0.8) for ex in m.experts)
    assert MoEINR(M=2, k=3, init_output_mean=None).experts[0].bias.abs().item() < 1 / (16 ** 0.5) + 1e-6
    with pytest.raises(ConfigError, match="init_output_mean"):
        MoEINR(M=2, k=3, init_output_mean="mean")
