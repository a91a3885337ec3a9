"""Embedded time-varying demo volume: Taylor-Green vortex decay from a pseudo-spectral Navier-Stokes solver.

    python -m datasets.taylor_green --root data/moe_demo [--resolution 32 --n_saves 25 --t_end 12 --reynolds 400]

The solver integrates the incompressible Navier-Stokes equations in a 2 pi-periodic box (unit density),

    du/dt = P[u x omega] - nu curl curl u,   div u = 0,   omega = curl u,   nu = 1 / Re,

with a Fourier pseudo-spectral discretization: velocity stored as real-FFT coefficients, the nonlinear term
in rotational form computed in physical space and transformed back, 2/3-rule dealiasing (modes with
|k_i| > N/3 on any axis are zeroed), the Leray projection P = I - k k^T / |k|^2 (divergence exactly 0 in
spectral space, up to rounding), and classic RK4 time stepping with dt = ``cfl`` * (2 pi / N) (velocity scale 1,
checked against the viscous limit). The nonlinear term of the truncated (Galerkin) system conserves energy, so
the kinetic energy E = <|u|^2> / 2 decays monotonically at the rate 2 nu Z (enstrophy Z = <|omega|^2> / 2).

Initial condition (the classic benchmark, V0 = 1, L = 1):
    u = sin x cos y cos z,  v = -cos x sin y cos z,  w = 0.
The large vortices stretch, break down into smaller structures (peak dissipation near t = 9 at high Re)
and decay. Saved field: the vorticity magnitude |omega| at ``n_saves`` equally spaced times from 0 to
``t_end`` inclusive, float32 array [T, Z, Y, X] (array axis 0 = z, 1 = y, 2 = x; grid point j of an axis sits at
2 pi j / N). At 32^3 and Re 400 the smallest structures are near the grid scale late in the run: the data are a
well-defined discrete solution (deterministic for a given NumPy/SciPy FFT), not a converged DNS.

Layout written on first use (atomic: written to a hidden temporary file, then renamed):
``<root>/tg_N<resolution>_T<n_saves>_Re<reynolds>_t<t_end>.npy`` and a ``.json`` beside it with the settings,
the time of each saved step and the kinetic energy / max divergence history. Measured (2-core AMD EPYC VM,
shared): 32^3, 25 saves to t = 12: 4.4 s; 48^3: 27 s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Dict, Optional

import numpy as np

from datasets.timevolume import TimeVolumeDataset
from util.errors import DataError
from util.registry import ConfigError, register

__all__ = ["TaylorGreenSolver", "taylor_green_velocity", "generate_taylor_green", "taylor_green_path",
           "TaylorGreenDataset", "GENERATOR_VERSION"]

log = logging.getLogger(__name__)

#: bump when the solver's output changes (a file written by an older version is regenerated)
GENERATOR_VERSION = 1


def _fft():
    try:
        import scipy.fft as sfft

        return sfft.rfftn, sfft.irfftn
    except ImportError:  # pragma: no cover - scipy is a requirement
        return np.fft.rfftn, np.fft.irfftn


def taylor_green_velocity(n: int) -> np.ndarray:
    """The analytic Taylor-Green initial velocity on the n^3 grid: float64 (3, n, n, n) = (u, v, w) on axes
    (z, y, x), grid point j at 2 pi j / n."""
    g = 2.0 * np.pi * np.arange(n) / n
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    u = np.sin(x) * np.cos(y) * np.cos(z)
    v = -np.cos(x) * np.sin(y) * np.cos(z)
    return np.stack([u, v, np.zeros_like(u)])


class TaylorGreenSolver:
    """Pseudo-spectral incompressible Navier-Stokes solver on the 2 pi-periodic n^3 grid (see module docstring).

    Args:
        n: grid points per axis (even, >= 8).
        reynolds: Re = V0 L / nu with V0 = L = 1.
        cfl: dt = cfl * 2 pi / n.
    """

    def __init__(self, n: int = 32, reynolds: float = 400.0, cfl: float = 0.25):
        if not (isinstance(n, int) and n >= 8 and n % 2 == 0):
            raise ConfigError(f"taylor_green resolution must be an even integer >= 8, got {n!r}")
        if not reynolds > 0 or not cfl > 0:
            raise ConfigError(f"taylor_green reynolds and cfl must be > 0, got {reynolds!r}, {cfl!r}")
        self.n, self.nu = n, 1.0 / float(reynolds)
        self.rfftn, self.irfftn = _fft()
        k = np.fft.fftfreq(n, 1.0 / n)
        kr = np.fft.rfftfreq(n, 1.0 / n)
        kz, ky, kx = np.meshgrid(k, k, kr, indexing="ij")
        self.k = np.stack([kx, ky, kz])  # component order (x, y, z) like the velocity
        self.k2 = kx ** 2 + ky ** 2 + kz ** 2
        self.k2_safe = np.where(self.k2 == 0, 1.0, self.k2)
        cut = n / 3.0
        self.dealias = (np.abs(kx) < cut) & (np.abs(ky) < cut) & (np.abs(kz) < cut)
        dt = cfl * 2.0 * np.pi / n
        if self.nu * float(self.k2.max()) * dt > 2.5:  # RK4 stability on the imaginary/real axis ~2.8
            dt = 2.5 / (self.nu * float(self.k2.max()))
        self.dt = dt
        self.t = 0.0
        self.u_hat = self.fwd(taylor_green_velocity(n))
        self.u_hat = self.project(self.u_hat)

    # transforms over the three spatial axes of (3, n, n, n) arrays
    def fwd(self, a: np.ndarray) -> np.ndarray:
        return self.rfftn(a, axes=(-3, -2, -1))

    def inv(self, a: np.ndarray) -> np.ndarray:
        return self.irfftn(a, s=(self.n,) * 3, axes=(-3, -2, -1))

    def project(self, a_hat: np.ndarray) -> np.ndarray:
        """Leray projection onto divergence-free fields: a - k (k . a) / |k|^2."""
        kdota = np.einsum("i...,i...->...", self.k, a_hat)
        return a_hat - self.k * (kdota / self.k2_safe)

    def curl_hat(self, u_hat: np.ndarray) -> np.ndarray:
        kx, ky, kz = self.k
        ux, uy, uz = u_hat
        return 1j * np.stack([ky * uz - kz * uy, kz * ux - kx * uz, kx * uy - ky * ux])

    def rhs(self, u_hat: np.ndarray) -> np.ndarray:
        u = self.inv(u_hat)
        w = self.inv(self.curl_hat(u_hat))
        cross = np.stack([u[1] * w[2] - u[2] * w[1], u[2] * w[0] - u[0] * w[2], u[0] * w[1] - u[1] * w[0]])
        nl = self.project(self.fwd(cross) * self.dealias)
        return nl - self.nu * self.k2 * u_hat

    def step(self) -> None:
        """One classic RK4 step of size dt."""
        dt, u0 = self.dt, self.u_hat
        k1 = self.rhs(u0)
        k2 = self.rhs(u0 + 0.5 * dt * k1)
        k3 = self.rhs(u0 + 0.5 * dt * k2)
        k4 = self.rhs(u0 + dt * k3)
        self.u_hat = u0 + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        self.t += dt

    def advance_to(self, t: float) -> None:
        """Integrate to time t exactly (the last step is shortened)."""
        full = self.dt
        while self.t < t - 1e-12:
            self.dt = min(full, t - self.t)
            self.step()
        self.dt = full

    # diagnostics
    def velocity(self) -> np.ndarray:
        return self.inv(self.u_hat)

    def vorticity(self) -> np.ndarray:
        return self.inv(self.curl_hat(self.u_hat))

    def vorticity_magnitude(self) -> np.ndarray:
        return np.sqrt(np.sum(self.vorticity() ** 2, axis=0))

    def energy(self) -> float:
        """Kinetic energy <|u|^2> / 2 (volume mean)."""
        return 0.5 * float(np.mean(np.sum(self.velocity() ** 2, axis=0)))

    def max_divergence(self) -> float:
        """max |div u| in physical space."""
        div_hat = 1j * np.einsum("i...,i...->...", self.k, self.u_hat)
        return float(np.abs(self.irfftn(div_hat, s=(self.n,) * 3)).max())


def _settings(resolution: int, n_saves: int, t_end: float, reynolds: float) -> Dict:
    return dict(resolution=int(resolution), n_saves=int(n_saves), t_end=float(t_end), reynolds=float(reynolds),
                version=GENERATOR_VERSION)


def taylor_green_path(root: str, resolution: int = 32, n_saves: int = 25, t_end: float = 12.0,
                      reynolds: float = 400.0) -> str:
    """File name of a setting's vorticity-magnitude volume under ``root``."""
    return os.path.join(root, f"tg_N{int(resolution)}_T{int(n_saves)}_Re{float(reynolds):g}_t{float(t_end):g}.npy")


def generate_taylor_green(root: str = "data/moe_demo", resolution: int = 32, n_saves: int = 25,
                          t_end: float = 12.0, reynolds: float = 400.0, force: bool = False) -> str:
    """Run the solver and write |omega| [n_saves, N, N, N] float32 (reused when present with the same settings).

    Returns:
        path of the .npy file.
    """
    if not (isinstance(n_saves, int) and n_saves >= 2):
        raise ConfigError(f"taylor_green n_saves must be an integer >= 2, got {n_saves!r}")
    if not t_end > 0:
        raise ConfigError(f"taylor_green t_end must be > 0, got {t_end!r}")
    path = taylor_green_path(root, resolution, n_saves, t_end, reynolds)
    meta_path = path[:-4] + ".json"
    want = _settings(resolution, n_saves, t_end, reynolds)
    if not force and os.path.isfile(path) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                have = json.load(f)
            if all(have.get(k) == v for k, v in want.items()):
                return path
        except (OSError, ValueError):
            pass
    os.makedirs(root, exist_ok=True)
    solver = TaylorGreenSolver(int(resolution), reynolds)
    times = np.linspace(0.0, float(t_end), int(n_saves))
    out = np.empty((int(n_saves),) + (int(resolution),) * 3, dtype=np.float32)
    energy, divergence = [], []
    for i, t in enumerate(times):
        solver.advance_to(float(t))
        out[i] = solver.vorticity_magnitude()
        energy.append(solver.energy())
        divergence.append(solver.max_divergence())
    if not np.isfinite(out).all():  # pragma: no cover - a stable dt keeps it finite
        raise DataError(f"Taylor-Green solver diverged (N={resolution}, Re={reynolds}); lower reynolds")
    info = dict(want, times=[float(t) for t in times], energy=energy, max_divergence=divergence, dt=solver.dt,
                shape=list(out.shape), axes="t, z, y, x", variable="vorticity magnitude")
    for target, write in ((path, lambda f: np.save(f, out, allow_pickle=False)),
                          (meta_path, lambda f: f.write(json.dumps(info, indent=1).encode()))):
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    log.info("Taylor-Green vortex: %s (%d steps of dt=%.4f, E %.4f -> %.4f)", path, len(times), solver.dt,
             energy[0], energy[-1])
    return path


@register("dataset", "taylor_green")
class TaylorGreenDataset(TimeVolumeDataset):
    """The embedded demo: vorticity magnitude of the decaying Taylor-Green vortex (solver run on first use),
    served like ``time_volume``.

    Args:
        root: folder of the generated file (relative to the working directory).
        resolution: grid points per axis (even; 32 default, up to 48 in about half a minute).
        n_saves: saved time steps T (equally spaced from t = 0 to t_end).
        t_end: final time (convective units).
        reynolds: Reynolds number (viscosity 1 / Re).
        batch_size: coordinates per training batch.
        value_norm: "global" or "per_step" (see time_volume).
        seed: batch seed (injected from train.seed).
    """

    def __init__(self, root: str = "data/moe_demo", resolution: int = 32, n_saves: int = 25, t_end: float = 12.0,
                 reynolds: float = 400.0, batch_size: int = 16000, value_norm: str = "global", seed: int = 0):
        path = generate_taylor_green(root, resolution, n_saves, t_end, reynolds)
        super().__init__(path=path, batch_size=batch_size, value_norm=value_norm, seed=seed)


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/moe_demo")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--n_saves", type=int, default=25)
    p.add_argument("--t_end", type=float, default=12.0)
    p.add_argument("--reynolds", type=float, default=400.0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    print(generate_taylor_green(a.root, a.resolution, a.n_saves, a.t_end, a.reynolds, force=a.force))


if __name__ == "__main__":
    main()
