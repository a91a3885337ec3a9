"""Taylor-Green demo solver (datasets/taylor_green.py): invariants of the incompressible NS solution on a tiny
grid, checked against physics, not against the solver's own output."""
import json
import os

import numpy as np
import pytest

from datasets.taylor_green import TaylorGreenSolver, generate_taylor_green, taylor_green_velocity


def test_initial_field_is_analytic_taylor_green():
    n = 12
    s = TaylorGreenSolver(n, reynolds=100.0)
    u = s.velocity()
    g = 2 * np.pi * np.arange(n) / n
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    np.testing.assert_allclose(u[0], np.sin(x) * np.cos(y) * np.cos(z), atol=1e-12)
    np.testing.assert_allclose(u[1], -np.cos(x) * np.sin(y) * np.cos(z), atol=1e-12)
    np.testing.assert_allclose(u[2], 0.0, atol=1e-12)
    # E0 = <u^2 + v^2> / 2 = 1/8 for V0 = 1; vorticity of TG by hand: w_z = 2 sin x sin y cos z ... check |w|
    assert s.energy() == pytest.approx(0.125, rel=1e-12)
    w = s.vorticity()
    np.testing.assert_allclose(w[0], -np.cos(x) * np.sin(y) * np.sin(z), atol=1e-10)
    np.testing.assert_allclose(w[1], -np.sin(x) * np.cos(y) * np.sin(z), atol=1e-10)
    np.testing.assert_allclose(w[2], 2 * np.sin(x) * np.sin(y) * np.cos(z), atol=1e-10)


def test_energy_decays_monotonically_and_divergence_stays_zero():
    s = TaylorGreenSolver(16, reynolds=200.0)
    energies, divs = [s.energy()], [s.max_divergence()]
    for _ in range(40):
        s.step()
        energies.append(s.energy())
        divs.append(s.max_divergence())
    assert np.all(np.diff(energies) < 0), "kinetic energy must decay at every step"
    assert energies[-1] < energies[0] * 0.999
    assert max(divs) < 1e-12


def test_early_decay_rate_matches_viscous_dissipation():
    # at t -> 0 the TG flow decays purely viscously: dE/dt = -2 nu Z, Z = <|w|^2>/2 = 3 * 1/8 for TG (|k|^2 = 3)
    re = 50.0
    s = TaylorGreenSolver(16, reynolds=re)
    s.dt = 1e-3
    e0 = s.energy()
    s.step()
    rate = (s.energy() - e0) / 1e-3
    assert rate == pytest.approx(-2 * (1 / re) * 3 * 0.125, rel=2e-3)


def test_generate_writes_deterministic_volume(tmp_path):
    p1 = generate_taylor_green(str(tmp_path / "a"), resolution=8, n_saves=3, t_end=0.5, reynolds=100.0)
    p2 = generate_taylor_green(str(tmp_path / "b"), resolution=8, n_saves=3, t_end=0.5, reynolds=100.0)
    a, b = np.load(p1), np.load(p2)
    assert a.shape == (3, 8, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # step 0 is |curl u0| of the analytic field
    g = 2 * np.pi * np.arange(8) / 8
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    w0 = np.sqrt((np.cos(x) * np.sin(y) * np.sin(z)) ** 2 + (np.sin(x) * np.cos(y) * np.sin(z)) ** 2
                 + (2 * np.sin(x) * np.sin(y) * np.cos(z)) ** 2)
    np.testing.assert_allclose(a[0], w0, atol=1e-5)
    info = json.load(open(p1[:-4] + ".json"))
    assert info["times"] == [0.0, 0.25, 0.5]
    assert np.all(np.diff(info["energy"]) < 0)
    mtime = os.path.getmtime(p1)
    assert generate_taylor_green(str(tmp_path / "a"), resolution=8, n_saves=3, t_end=0.5, reynolds=100.0) == p1
    assert os.path.getmtime(p1) == mtime  # reused, not regenerated


def test_velocity_helper_shape():
    assert taylor_green_velocity(8).shape == (3, 8, 8, 8)
