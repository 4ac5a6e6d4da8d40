r"""Batched MD integrators: pure functions ``MDState -> MDState`` over every walker at once.

One step of :func:`step` for a walker with time step :math:`h` is the splitting

.. math::

    C(h)\; N(h/2)\; B(h/2)\; A(h/2)\; O(h)\; A(h/2)\; [\text{forces}]\; B(h/2)\; N(h/2)

with, per walker (each operator is the identity for walkers whose ensemble does not use it):

=====  ===========================================================  ============================================
 op     update                                                        variables
=====  ===========================================================  ============================================
 B      :math:`p \leftarrow p + \tfrac{h}{2} F`                       ``momenta``, ``forces``, ``dt``
 A      :math:`r \leftarrow r + \tfrac{h}{2} p/m`                     ``positions``, ``masses``
 O      Langevin: :math:`p \leftarrow c_1 p + \sqrt{(1-c_1^2) m k_BT}\,\xi`,
        :math:`c_1 = e^{-\gamma h}`                                   ``friction`` (γ), target T, ξ ~ N(0, 1)
 O      Bussi (SVR): :math:`p \leftarrow \alpha p`, α from the
        exact canonical rescaling of the kinetic energy K towards
        :math:`K_t = N_f k_BT/2` with :math:`c = e^{-h/\tau}`         ``tdamp`` (τ), ``ndof`` (N_f)
 N      Nosé–Hoover chain of M thermostats (Martyna, Klein, Tuckerman
        1992), Trotter half step: chain velocities
        :math:`v_{\xi_j}` kicked by :math:`G_1 = (2K - N_f k_BT)/Q_1`,
        :math:`G_j = (Q_{j-1} v_{\xi_{j-1}}^2 - k_BT)/Q_j`, momenta
        scaled by :math:`e^{-\frac{h}{2} v_{\xi_1}}`;
        :math:`Q_1 = N_f k_BT\tau^2`, :math:`Q_{j>1} = k_BT\tau^2`       ``chain_v``, ``chain_eta``, ``tdamp`` (τ)
 C      stochastic cell rescaling (Bernetti & Bussi, J. Chem. Phys.
        153, 114107 (2020)), Euler–Maruyama in :math:`\epsilon=\ln V`:
        :math:`d\epsilon = \frac{\beta_T}{\tau_p}(P_{int}-P_0)h
        + \sqrt{\frac{2k_BT\beta_T h}{V\tau_p}}\,\xi`; anisotropic:
        one :math:`\epsilon_a=\ln L_a` per Cartesian axis with
        :math:`\beta_T/3` and :math:`P_{int,aa}`; then
        :math:`r_a \leftarrow e^{d\epsilon_a} r_a`,
        :math:`p_a \leftarrow e^{-d\epsilon_a} p_a`, cell columns
        :math:`\times e^{d\epsilon_a}` (isotropic:
        :math:`d\epsilon_a = d\epsilon/3`)                              ``cells``, ``stress`` (σ, ASE sign),
                                                                      ``pdamp`` (τ_p), ``compressibility`` (β_T),
                                                                      :math:`P_{int} = \sum p\otimes p/(mV) - σ`
=====  ===========================================================  ============================================

NVE is B A A B = velocity Verlet; ``nvt-langevin`` is BAOAB (Leimkuhler & Matthews 2013);
``nvt-nose-hoover`` is N B A A B N; ``nvt-svr`` is B A O A B with the Bussi O; ``npt-iso`` and
``npt-aniso`` are C followed by BAOAB. Targets T(t) and P(t) are taken at the step being
reached (``step + 1``), as the ASE engine does. A walker with ``dt = 0`` does not move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from ase import units

from alflow.md.state import (
    ANISOTROPIC,
    ISOTROPIC,
    LANGEVIN,
    NOSE_HOOVER,
    NO_BAROSTAT,
    STREAM_BAROSTAT,
    STREAM_LANGEVIN,
    STREAM_SVR,
    SVR,
    MDState,
    kinetic_energy,
    normal,
    target_pressure,
    target_temperature,
    volumes,
)

ForceCall = Callable[[MDState], MDState]


def _atom_normals(state: MDState, stream: int) -> torch.Tensor:
    """(N, 3) standard normals from (walker seed, walker step, stream, 3·local + axis)."""
    counter = state.local[:, None] * 3 + torch.arange(3, device=state.device)
    b = state.batch[:, None]
    return normal(state.seed[b], state.step[b], stream, counter).to(state.dtype)


def kick(state: MDState) -> MDState:
    """B: p ← p + (h/2) F."""
    return replace(state, momenta=state.momenta + (0.5 * state.dt)[state.batch, None] * state.forces)


def drift(state: MDState, fraction: float = 0.5) -> MDState:
    """A: r ← r + fraction · h · p/m."""
    velocity = state.momenta / state.masses[:, None]
    return replace(state, positions=state.positions + (fraction * state.dt)[state.batch, None] * velocity)


def langevin(state: MDState, kT: torch.Tensor) -> MDState:
    """O (Langevin walkers): exact Ornstein–Uhlenbeck step of the momenta over h."""
    on = state.thermostat == LANGEVIN
    c1 = torch.where(on, torch.exp(-state.friction * state.dt), torch.ones_like(state.dt))
    c2 = torch.where(on, torch.sqrt((1.0 - c1 * c1).clamp_min(0.0)), torch.zeros_like(c1))
    sigma = torch.sqrt(state.masses * kT[state.batch]) * c2[state.batch]
    momenta = c1[state.batch, None] * state.momenta + sigma[:, None] * _atom_normals(state, STREAM_LANGEVIN)
    return replace(state, momenta=momenta)


def bussi(state: MDState, kT: torch.Tensor) -> MDState:
    """O (SVR walkers): Bussi–Donadio–Parrinello canonical velocity rescaling over h (J. Chem. Phys. 126, 014101)."""
    on = state.thermostat == SVR
    xi = _atom_normals(state, STREAM_SVR)
    counter = state.local[:, None] * 3 + torch.arange(3, device=state.device)
    first = torch.zeros_like(state.dt).index_add(0, state.batch, torch.where(counter == 0, xi, 0.0).sum(-1))
    rest_mask = (counter >= 1) & (counter < state.ndof[state.batch, None].long())
    chi2 = torch.zeros_like(state.dt).index_add(0, state.batch, torch.where(rest_mask, xi * xi, 0.0).sum(-1))
    kinetic = kinetic_energy(state).clamp_min(1e-300)
    target = 0.5 * state.ndof * kT
    c = torch.exp(-state.dt / state.tdamp.clamp_min(1e-300))
    ratio = target / (state.ndof * kinetic)
    alpha2 = c + (1 - c) * (chi2 + first * first) * ratio + 2 * first * torch.sqrt(c * (1 - c) * ratio)
    sign = torch.where(first + torch.sqrt(c / ((1 - c).clamp_min(1e-300) * ratio.clamp_min(1e-300))) < 0, -1.0, 1.0)
    alpha = torch.where(on, sign * torch.sqrt(alpha2.clamp_min(0.0)), torch.ones_like(alpha2))
    return replace(state, momenta=state.momenta * alpha[state.batch, None])


def nose_hoover_half(state: MDState, kT: torch.Tensor) -> MDState:
    """N: a half step (h/2) of the Nosé–Hoover chain for the Nosé–Hoover walkers."""
    on = state.thermostat == NOSE_HOOVER
    h = torch.where(on, state.dt, torch.zeros_like(state.dt))
    kT = kT.clamp_min(1e-12)
    m = state.chain_v.shape[1]
    q = (kT * state.tdamp**2)[:, None].expand(-1, m).clone()
    q[:, 0] = q[:, 0] * state.ndof
    v = list(state.chain_v.unbind(1))
    kinetic = kinetic_energy(state)

    def force(j: int, kin: torch.Tensor) -> torch.Tensor:
        if j == 0:
            return (2.0 * kin - state.ndof * kT) / q[:, 0]
        return (q[:, j - 1] * v[j - 1] ** 2 - kT) / q[:, j]

    v[m - 1] = v[m - 1] + 0.25 * h * force(m - 1, kinetic)
    for j in range(m - 2, -1, -1):
        e = torch.exp(-0.125 * h * v[j + 1])
        v[j] = (v[j] * e + 0.25 * h * force(j, kinetic)) * e
    scale = torch.exp(-0.5 * h * v[0])
    momenta = state.momenta * scale[state.batch, None]
    kinetic = kinetic * scale * scale
    eta = state.chain_eta + 0.5 * h[:, None] * torch.stack(v, 1)
    for j in range(m - 1):
        e = torch.exp(-0.125 * h * v[j + 1])
        v[j] = (v[j] * e + 0.25 * h * force(j, kinetic)) * e
    v[m - 1] = v[m - 1] + 0.25 * h * force(m - 1, kinetic)
    return replace(state, momenta=momenta, chain_v=torch.stack(v, 1), chain_eta=eta)


def pressure_tensor(state: MDState) -> torch.Tensor:
    """Instantaneous pressure tensor (B, 3, 3) eV/Å³: Σ p⊗p/(m V) − σ (σ: the last stress, ASE sign)."""
    outer = state.momenta[:, :, None] * state.momenta[:, None, :] / state.masses[:, None, None]
    kinetic = torch.zeros_like(state.cells).index_add(0, state.batch, outer)
    return kinetic / volumes(state.cells).clamp_min(1e-12)[:, None, None] - state.stress


def cell_rescale(state: MDState, kT: torch.Tensor, pressure: torch.Tensor) -> MDState:
    """C: stochastic cell rescaling over h for the NPT walkers (isotropic or one ε per Cartesian axis)."""
    on = state.barostat != NO_BAROSTAT
    h = torch.where(on, state.dt, torch.zeros_like(state.dt))
    volume = volumes(state.cells).clamp_min(1e-12)
    p_int = pressure_tensor(state)
    beta, tau = state.compressibility, state.pdamp.clamp_min(1e-300)
    counter = torch.arange(3, device=state.device)[None, :]
    xi = normal(state.seed[:, None], state.step[:, None], STREAM_BAROSTAT, counter).to(state.dtype)  # (B, 3)
    iso = (beta / tau) * (p_int.diagonal(dim1=1, dim2=2).mean(-1) - pressure) * h \
        + torch.sqrt(2 * kT * beta * h / (volume * tau)) * xi[:, 0]
    aniso = (beta / (3 * tau))[:, None] * (p_int.diagonal(dim1=1, dim2=2) - pressure[:, None]) * h[:, None] \
        + torch.sqrt(2 * kT * beta * h / (3 * volume * tau))[:, None] * xi
    d_eps = torch.where((state.barostat == ANISOTROPIC)[:, None], aniso,
                        torch.where((state.barostat == ISOTROPIC)[:, None], (iso / 3)[:, None].expand(-1, 3), 0.0))
    scale = torch.exp(d_eps)  # (B, 3); 1 exactly for walkers without a barostat
    return replace(
        state,
        positions=state.positions * scale[state.batch],
        momenta=state.momenta / scale[state.batch],
        cells=state.cells * scale[:, None, :],
    )


def kinds(state: MDState) -> tuple[frozenset[int], frozenset[int]]:
    """The thermostat and barostat codes present in ``state`` (read once per batch composition, not per step)."""
    return frozenset(state.thermostat.unique().tolist()), frozenset(state.barostat.unique().tolist())


def step(state: MDState, compute: ForceCall, present: tuple[frozenset[int], frozenset[int]] | None = None) -> MDState:
    """One MD step of every walker (module docstring); ``compute`` fills forces, energy, stress and scores.

    ``present``: :func:`kinds` of the state, to skip absent operators without a device→host read per step.
    """
    thermostats, barostats = kinds(state) if present is None else present
    reached = state.step + 1
    kT = units.kB * target_temperature(state, reached)
    if barostats - {NO_BAROSTAT}:
        state = cell_rescale(state, kT, target_pressure(state, reached))
    if NOSE_HOOVER in thermostats:
        state = nose_hoover_half(state, kT)
    state = kick(state)
    state = drift(state, 0.5)
    if LANGEVIN in thermostats:
        state = langevin(state, kT)
    if SVR in thermostats:
        state = bussi(state, kT)
    state = drift(state, 0.5)
    state = compute(state)
    state = kick(state)
    if NOSE_HOOVER in thermostats:
        state = nose_hoover_half(state, kT)
    return replace(state, step=reached)
