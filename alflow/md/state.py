"""The batched MD state and its counter-based random numbers.

:class:`MDState` holds B walkers with N atoms in all, concatenated walker after walker,
as tensors on one device: per atom (N, ...) and per walker (B, ...). Walkers of different
ensembles share one state; each walker's ``thermostat`` and ``barostat`` codes say which
operators act on it (the others act as the identity on it), so one model call per step
serves every walker.

Random numbers are *counter based*: the normal deviate for (walker seed, walker step,
stream, counter) is a pure function of those four integers (SplitMix64 hashing, then
Box–Muller), so a walker draws the same numbers whichever walkers share its batch, in
whatever order, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from ase import Atoms, units

# thermostat codes (per walker)
NO_THERMOSTAT, LANGEVIN, NOSE_HOOVER, SVR = 0, 1, 2, 3
# barostat codes (per walker)
NO_BAROSTAT, ISOTROPIC, ANISOTROPIC = 0, 1, 2
# random-number streams
STREAM_VELOCITIES, STREAM_LANGEVIN, STREAM_SVR, STREAM_BAROSTAT = 1, 2, 3, 4
CHAIN_LENGTH = 3  # Nosé–Hoover chain thermostats per walker

ENSEMBLE_CODES: dict[str, tuple[int, int]] = {
    "nve": (NO_THERMOSTAT, NO_BAROSTAT),
    "nvt-langevin": (LANGEVIN, NO_BAROSTAT),
    "nvt-nose-hoover": (NOSE_HOOVER, NO_BAROSTAT),
    "nvt-svr": (SVR, NO_BAROSTAT),
    "npt-iso": (LANGEVIN, ISOTROPIC),
    "npt-aniso": (LANGEVIN, ANISOTROPIC),
}

# ----------------------------------------------------------------------------- random numbers

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_K_STEP = _signed(0xD1B54A32D192ED03)
_K_SEED = _signed(0x8CB92BA72F3D8DD7)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def hash64(seed: torch.Tensor, step: torch.Tensor, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of (seed, step, stream, counter); broadcasting int64 tensors."""
    z = counter * _GOLDEN + stream
    z = _mix(z) + step * _K_STEP
    z = _mix(z) + seed * _K_SEED
    return _mix(z)


def uniform(seed: torch.Tensor, step: torch.Tensor, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """Uniform deviates in (0, 1), float64, one per broadcast element."""
    bits = _shr(hash64(seed, step, stream, counter), 11)
    return (bits.to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def normal(seed: torch.Tensor, step: torch.Tensor, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal deviates (float64) by Box–Muller from two hashed uniforms."""
    u1 = uniform(seed, step, 2 * stream, counter)
    u2 = uniform(seed, step, 2 * stream + 1, counter)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


# ----------------------------------------------------------------------------- state


@dataclass
class MDState:
    """B walkers, N atoms in all. Units: Å, amu, eV, ASE time; temperatures in K, pressures in eV/Å³.

    Per atom: ``positions``, ``momenta`` (amu·Å/ASE time), ``forces`` (eV/Å) (N, 3); ``masses`` (amu),
    ``numbers``, ``batch`` (walker index), ``local`` (index within the walker) (N,).
    Per walker: ``cells`` (B, 3, 3) rows are lattice vectors; ``pbc`` (B, 3); ``n_atoms``; ``dt``
    (ASE time; 0 freezes the walker); ``seed``; ``step`` (steps done); ``n_steps`` (budget);
    ``thermostat``/``barostat`` codes; ``friction`` (1/ASE time, Langevin); ``tdamp``/``pdamp``
    (ASE time; Nosé–Hoover and Bussi thermostat time, barostat time); ``compressibility``
    (Å³/eV, the barostat's assumed isothermal compressibility); ``ndof`` (kinetic degrees of
    freedom); ramps ``t_points`` (B, P) K and ``p_points`` (B, P) eV/Å³ with their counts;
    Nosé–Hoover chain ``chain_v`` (1/ASE time) and ``chain_eta`` (B, M); results of the last force
    call: ``energy`` (B,) eV, ``stress`` (B, 3, 3) eV/Å³ (ASE sign), ``max_force_deviation`` (B,),
    ``energy_deviation_per_atom`` (B,), ``force_deviation`` (N,), ``min_distance`` (B,) Å (closest pair,
    inf without pairs) and ``max_abs_force`` (B,) eV/Å (largest force component; inf when positions,
    energy or forces were not finite — such forces are stored as zeros).
    """

    positions: torch.Tensor
    momenta: torch.Tensor
    masses: torch.Tensor
    numbers: torch.Tensor
    batch: torch.Tensor
    local: torch.Tensor
    cells: torch.Tensor
    pbc: torch.Tensor
    n_atoms: torch.Tensor
    dt: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    n_steps: torch.Tensor
    thermostat: torch.Tensor
    barostat: torch.Tensor
    friction: torch.Tensor
    tdamp: torch.Tensor
    pdamp: torch.Tensor
    compressibility: torch.Tensor
    ndof: torch.Tensor
    t_points: torch.Tensor
    t_count: torch.Tensor
    p_points: torch.Tensor
    p_count: torch.Tensor
    chain_v: torch.Tensor
    chain_eta: torch.Tensor
    forces: torch.Tensor
    energy: torch.Tensor
    stress: torch.Tensor
    max_force_deviation: torch.Tensor
    energy_deviation_per_atom: torch.Tensor
    force_deviation: torch.Tensor
    min_distance: torch.Tensor
    max_abs_force: torch.Tensor

    @property
    def n_walkers(self) -> int:
        return int(self.cells.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype


PER_ATOM = ("positions", "momenta", "masses", "numbers", "batch", "local", "forces", "force_deviation")


@dataclass
class WalkerSetup:
    """What :func:`make_state` needs to know about one walker. Units: K, GPa, fs, 1/fs."""

    atoms: Atoms
    ensemble: str
    temperature: float | Sequence[float]
    pressure: float | Sequence[float] | None
    timestep: float
    steps: int
    seed: int
    friction: float = 0.01
    tdamp_steps: float = 100.0  # thermostat time in timesteps (Nosé–Hoover, Bussi), as the ASE engine
    pdamp_steps: float = 1000.0  # barostat time in timesteps, as the ASE engine
    compressibility_per_gpa: float = 0.01  # assumed isothermal compressibility (1/GPa): 1/(100 GPa)
    thermalize: bool = True  # draw Maxwell–Boltzmann momenta at the first temperature; else keep atoms' momenta


def _points(value: float | Sequence[float] | None, scale: float = 1.0) -> list[float]:
    if value is None:
        return [0.0]
    return [float(v) * scale for v in np.ravel(np.asarray(value, dtype=float))]


def make_state(setups: Sequence[WalkerSetup], *, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> MDState:
    """A fresh state for ``setups`` (momenta drawn from the walker's seed, centre-of-mass momentum removed).

    Forces and scores are zeros until the first force call.
    """
    if not setups:
        raise ValueError("setups: expected at least one walker")
    device = torch.device(device)
    counts = [len(s.atoms) for s in setups]
    n, b = sum(counts), len(setups)
    pos = torch.as_tensor(np.concatenate([s.atoms.positions for s in setups]), dtype=dtype, device=device)
    masses = torch.as_tensor(np.concatenate([s.atoms.get_masses() for s in setups]), dtype=dtype, device=device)
    numbers = torch.as_tensor(np.concatenate([s.atoms.numbers for s in setups]), dtype=torch.long, device=device)
    n_atoms = torch.tensor(counts, dtype=torch.long, device=device)
    batch = torch.repeat_interleave(torch.arange(b, device=device), n_atoms)
    starts = torch.cumsum(n_atoms, 0) - n_atoms
    local = torch.arange(n, device=device) - starts[batch]
    codes = [ENSEMBLE_CODES[s.ensemble] for s in setups]
    t_pts = [_points(s.temperature) for s in setups]
    p_pts = [_points(s.pressure, units.GPa) for s in setups]
    width = max(max(len(p) for p in t_pts), max(len(p) for p in p_pts))

    def pad(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=dtype, device=device)

    dt = torch.tensor([s.timestep * units.fs for s in setups], dtype=dtype, device=device)
    ndof = torch.tensor([3 * c if code[0] == LANGEVIN else max(3 * c - 3, 1) for c, code in zip(counts, codes)],
                        dtype=dtype, device=device)

    def per_walker(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    state = MDState(
        positions=pos,
        momenta=torch.zeros_like(pos),
        masses=masses,
        numbers=numbers,
        batch=batch,
        local=local,
        cells=torch.as_tensor(np.stack([s.atoms.cell.array for s in setups]), dtype=dtype, device=device),
        pbc=torch.as_tensor(np.stack([s.atoms.pbc for s in setups]), dtype=torch.bool, device=device),
        n_atoms=n_atoms,
        dt=dt,
        seed=torch.tensor([int(s.seed) for s in setups], dtype=torch.long, device=device),
        step=torch.zeros(b, dtype=torch.long, device=device),
        n_steps=torch.tensor([int(s.steps) for s in setups], dtype=torch.long, device=device),
        thermostat=torch.tensor([c[0] for c in codes], dtype=torch.long, device=device),
        barostat=torch.tensor([c[1] for c in codes], dtype=torch.long, device=device),
        friction=per_walker([s.friction / units.fs for s in setups]),
        tdamp=dt * per_walker([s.tdamp_steps for s in setups]),
        pdamp=dt * per_walker([s.pdamp_steps for s in setups]),
        compressibility=per_walker([s.compressibility_per_gpa / units.GPa for s in setups]),
        ndof=ndof,
        t_points=pad(t_pts),
        t_count=torch.tensor([len(p) for p in t_pts], dtype=torch.long, device=device),
        p_points=pad(p_pts),
        p_count=torch.tensor([len(p) for p in p_pts], dtype=torch.long, device=device),
        chain_v=torch.zeros(b, CHAIN_LENGTH, dtype=dtype, device=device),
        chain_eta=torch.zeros(b, CHAIN_LENGTH, dtype=dtype, device=device),
        forces=torch.zeros_like(pos),
        energy=torch.zeros(b, dtype=dtype, device=device),
        stress=torch.zeros(b, 3, 3, dtype=dtype, device=device),
        max_force_deviation=torch.zeros(b, dtype=dtype, device=device),
        energy_deviation_per_atom=torch.zeros(b, dtype=dtype, device=device),
        force_deviation=torch.zeros(n, dtype=dtype, device=device),
        min_distance=torch.full((b,), math.inf, dtype=dtype, device=device),
        max_abs_force=torch.zeros(b, dtype=dtype, device=device),
    )
    thermal = thermal_momenta(state, target_temperature(state))
    given = torch.as_tensor(np.concatenate([s.atoms.get_momenta() for s in setups]), dtype=dtype, device=device)
    keep = torch.tensor([not s.thermalize for s in setups], device=device)[batch]
    state.momenta = torch.where(keep[:, None], given, thermal)
    return state


def thermal_momenta(state: MDState, temperature: torch.Tensor) -> torch.Tensor:
    """Maxwell–Boltzmann momenta at ``temperature`` (B,) K from each walker's seed, zero total momentum."""
    counter = state.local[:, None] * 3 + torch.arange(3, device=state.device)
    xi = normal(state.seed[state.batch][:, None], torch.full_like(counter, -1), STREAM_VELOCITIES, counter)
    kT = (units.kB * temperature)[state.batch]
    p = xi.to(state.dtype) * torch.sqrt(state.masses * kT)[:, None]
    total = torch.zeros_like(state.cells[:, 0]).index_add(0, state.batch, p)
    mass = torch.zeros_like(state.dt).index_add(0, state.batch, state.masses)
    return p - state.masses[:, None] * (total / mass[:, None])[state.batch]


def _interp(points: torch.Tensor, count: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Per-walker ``np.interp(fraction, linspace(0, 1, count), points[:count])``."""
    segments = (count - 1).clamp_min(1).to(points.dtype)
    x = fraction.clamp(0.0, 1.0) * segments
    i0 = torch.minimum(x.floor().long(), (count - 2).clamp_min(0))
    w = (x - i0.to(points.dtype)).clamp(0.0, 1.0)
    lo = points.gather(1, i0[:, None])[:, 0]
    hi = points.gather(1, torch.minimum(i0 + 1, count - 1)[:, None])[:, 0]
    return torch.where(count > 1, lo + w * (hi - lo), points[:, 0])


def ramp_fraction(state: MDState, step: torch.Tensor | None = None) -> torch.Tensor:
    step = state.step if step is None else step
    return step.to(state.dtype) / state.n_steps.clamp_min(1).to(state.dtype)


def target_temperature(state: MDState, step: torch.Tensor | None = None) -> torch.Tensor:
    """Target temperature (B,) K at ``step`` (default: the walkers' current step), linear ramps."""
    return _interp(state.t_points, state.t_count, ramp_fraction(state, step))


def target_pressure(state: MDState, step: torch.Tensor | None = None) -> torch.Tensor:
    """Target pressure (B,) eV/Å³ at ``step``."""
    return _interp(state.p_points, state.p_count, ramp_fraction(state, step))


def kinetic_energy(state: MDState) -> torch.Tensor:
    """(B,) eV."""
    per_atom = 0.5 * (state.momenta**2).sum(-1) / state.masses
    return torch.zeros_like(state.dt).index_add(0, state.batch, per_atom)


def temperature(state: MDState) -> torch.Tensor:
    """Kinetic temperature (B,) K, 2 K / (ndof kB)."""
    return 2.0 * kinetic_energy(state) / (state.ndof * units.kB)


def volumes(cells: torch.Tensor) -> torch.Tensor:
    return torch.linalg.det(cells).abs()


def select(state: MDState, walkers: torch.Tensor) -> MDState:
    """The sub-state of the walkers at indices ``walkers`` (1-D long tensor), renumbered 0..len-1."""
    walkers = walkers.to(state.device)
    keep_atom = torch.isin(state.batch, walkers)
    new_index = torch.full((state.n_walkers,), -1, dtype=torch.long, device=state.device)
    new_index[walkers] = torch.arange(len(walkers), device=state.device)
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if f.name in PER_ATOM:
            out[f.name] = value[keep_atom]
        else:
            out[f.name] = value[walkers]
    out["batch"] = new_index[state.batch[keep_atom]]
    # atoms must stay grouped in walker order: reorder when ``walkers`` is not increasing
    order = torch.argsort(out["batch"], stable=True)
    for name in PER_ATOM:
        out[name] = out[name][order]
    return replace(state, **out)


def concat(first: MDState, second: MDState) -> MDState:
    """Walkers of ``first`` then those of ``second`` (ramps padded to a common width)."""
    out = {}
    for f in fields(first):
        a, b = getattr(first, f.name), getattr(second, f.name)
        if f.name in ("t_points", "p_points") and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            a = torch.cat([a, a[:, -1:].expand(-1, width - a.shape[1])], 1)
            b = torch.cat([b, b[:, -1:].expand(-1, width - b.shape[1])], 1)
        out[f.name] = torch.cat([a, b])
    out["batch"] = torch.cat([first.batch, second.batch + first.n_walkers])
    return replace(first, **out)
