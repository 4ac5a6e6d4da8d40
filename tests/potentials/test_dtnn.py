"""DTNN-specific checks: the paper's equations written out in numpy over periodic images, continuity at the
cutoff, committee-style vmap and a short training run (the Potential contract is in test_contract.py)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.base import compute_properties
from potentials.committee import Committee
from conftest import emt_training_batch, force_training_losses

SPECIES = [28, 29]
SMALL = dict(n_atom_basis=8, n_factors=6, n_interactions=2, n_rbf=7)


def image_neighbours(atoms: Atoms, i: int, cutoff: float) -> list[tuple[int, float]]:
    """(j, d) for every image of every atom within ``cutoff`` of atom i, by looping over cell shifts."""
    cell = atoms.cell.array
    reach = [math.ceil(cutoff * np.linalg.norm(b)) + 1 for b in np.linalg.inv(cell).T]
    out = []
    for shift in itertools.product(*(range(-n, n + 1) for n in reach)):
        for j in range(len(atoms)):
            d = np.linalg.norm(atoms.positions[j] - atoms.positions[i] + np.array(shift) @ cell)
            if 0 < d < cutoff:
                out.append((j, d))
    return out


def small_model(cutoff: float = 4.0, seed: int = 0) -> potentials.Potential:
    torch.manual_seed(seed)
    model = potentials.build("dtnn", SPECIES, cutoff, **SMALL).double().eval()
    with torch.no_grad():  # biases start at zero: perturb everything so that each term matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def cu_ni_cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[0, 2]] = 28
    atoms.rattle(0.1, seed=3)
    return atoms


def test_matches_the_paper_equations():
    atoms = cu_ni_cell()
    cutoff = 4.0
    model = small_model(cutoff)
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # Gaussian centres evenly spaced on [0, r_c], width = spacing (buffers built in float32, hence 1e-6)
    mu, sigma = w["radial_basis.centers"], np.sqrt(-0.5 / w["radial_basis.coeff"])
    np.testing.assert_allclose(mu, np.linspace(0.0, cutoff, SMALL["n_rbf"]), rtol=1e-6)
    np.testing.assert_allclose(sigma, cutoff / (SMALL["n_rbf"] - 1), rtol=1e-6)
    species = np.array([SPECIES.index(z) for z in atoms.numbers])
    c = w["embedding.weight"][species]
    neighbours = [image_neighbours(atoms, i, cutoff) for i in range(len(atoms))]
    for t in range(SMALL["n_interactions"]):
        p = f"interactions.{t}."
        update = np.zeros_like(c)
        for i, neigh in enumerate(neighbours):
            for j, d in neigh:
                rbf = np.exp(-((d - mu) ** 2) / (2 * sigma**2))
                a = w[p + "atom_to_factor.weight"] @ c[j] + w[p + "atom_to_factor.bias"]
                b = w[p + "rbf_to_factor.weight"] @ rbf + w[p + "rbf_to_factor.bias"]
                f_cut = 0.5 * (np.cos(np.pi * d / cutoff) + 1)
                update[i] += np.tanh(w[p + "factor_to_atom.weight"] @ (a * b)) * f_cut
        c = c + update
    hidden = np.tanh(c @ w["readout.0.weight"].T + w["readout.0.bias"])
    expected = hidden @ w["readout.2.weight"].T + w["readout.2.bias"]
    got = model(atoms_to_batch(atoms, cutoff, dtype=torch.float64), forces=False)[keys.NODE_ENERGY]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got.detach().numpy(), expected[:, 0], rtol=1e-10, atol=1e-10)


def test_energy_and_forces_continuous_at_the_cutoff():
    """A dimer in a 12 Å box: the interaction fades out smoothly and vanishes beyond the cutoff."""
    cutoff = 4.0
    model = small_model(cutoff)

    def dimer(r: float) -> dict[str, np.ndarray]:
        atoms = Atoms("CuNi", positions=[[1, 1, 1], [1 + r, 1, 1]], cell=[12, 12, 12], pbc=True)
        out = model(atoms_to_batch(atoms, cutoff, dtype=torch.float64), forces=True)
        return {k: v.detach().numpy() for k, v in out.items()}

    inside, outside, far = dimer(cutoff - 1e-4), dimer(cutoff + 1e-4), dimer(5.5)
    assert abs(dimer(3.0)[keys.ENERGY][0] - far[keys.ENERGY][0]) > 1e-3  # the pair does interact
    assert abs(inside[keys.ENERGY][0] - outside[keys.ENERGY][0]) < 1e-6
    assert np.abs(inside[keys.FORCES]).max() < 1e-3
    np.testing.assert_allclose(outside[keys.ENERGY], far[keys.ENERGY], rtol=0, atol=1e-12)


def test_committee_is_vectorized_and_exact():
    """A committee of DTNN members runs in one torch.vmap pass and reproduces each member."""
    members = [small_model(seed=s) for s in range(3)]
    committee = Committee(members, vectorize=True)
    batch = atoms_to_batch([cu_ni_cell(), bulk("Ni", "fcc", a=3.52)], members[0].cutoff, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sequential fallback would warn
        out = committee(batch, forces=True, stress=True)
    assert committee.vectorized
    for k, member in enumerate(members):
        ref = compute_properties(member, batch, forces=True, stress=True)
        torch.testing.assert_close(out[keys.ENERGIES][k], ref[keys.ENERGY], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[keys.FORCES_COMM][k], ref[keys.FORCES], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[keys.STRESS_COMM][k], ref[keys.STRESS], rtol=1e-10, atol=1e-12)
    assert float(out[keys.FORCES_VAR].detach().max()) > 1e-8  # the members differ


def test_hparams_and_errors():
    model = potentials.build("dtnn", SPECIES, 5.0)
    assert model.hparams == dict(n_atom_basis=64, n_factors=64, n_interactions=3, n_rbf=25)
    assert abs(float(model.radial_basis.centers[1]) - 5.0 / 24) < 1e-6  # ~0.2 Å spacing, as the paper
    with pytest.raises(ValueError, match="n_factors"):
        potentials.build("dtnn", SPECIES, 5.0, n_factors=0)


def test_short_training_reduces_force_error():
    batch = emt_training_batch()
    torch.manual_seed(0)
    model = potentials.build("dtnn", ["Cu"], 4.0, n_atom_basis=32, n_factors=32, n_interactions=2, n_rbf=16).double()
    losses, zero_model = force_training_losses(model, batch)  # zero_model: the loss of predicting no force
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2 * zero_model, (zero_model, losses[::8])
