"""ANI-specific checks: the AEV against a brute-force numpy implementation over periodic images,
its length, the angular cutoff, per-species networks, AEV standardisation and a short training run."""

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
from potentials.ani import ANI
from potentials.base import compute_properties
from potentials.committee import Committee
from conftest import emt_training_batch, force_training_losses

SPECIES = [28, 29]  # Ni, Cu -> species index 0, 1


def image_neighbours(atoms: Atoms, i: int, cutoff: float) -> list[tuple[int, np.ndarray]]:
    """(j, D) for every image of every atom within ``cutoff`` of atom i, found by looping over cell shifts."""
    cell = atoms.cell.array
    reach = [math.ceil(cutoff * np.linalg.norm(b)) + 1 for b in np.linalg.inv(cell).T]
    out = []
    for shift in itertools.product(*(range(-n, n + 1) for n in reach)):
        for j in range(len(atoms)):
            D = atoms.positions[j] - atoms.positions[i] + np.array(shift) @ cell
            d = np.linalg.norm(D)
            if 0 < d < cutoff:
                out.append((j, D))
    return out


def brute_force_aev(atoms: Atoms, cutoff: float, hp: dict) -> np.ndarray:
    """The documented ANI AEV, written out with loops (float64)."""
    n_sp = len(SPECIES)
    r_ca = min(hp["angular_cutoff"], cutoff)
    shf_r = hp["radial_start"] + np.arange(hp["n_radial"]) * (cutoff - hp["radial_start"]) / hp["n_radial"]
    shf_a = hp["angular_start"] + np.arange(hp["n_angular"]) * (r_ca - hp["angular_start"]) / hp["n_angular"]
    shf_z = (2 * np.arange(hp["n_angle_sections"]) + 1) * np.pi / (2 * hp["n_angle_sections"])
    pairs = [(a, b) for a in range(n_sp) for b in range(a, n_sp)]

    def fc(r: float, rc: float) -> float:
        return 0.5 * (np.cos(np.pi * r / rc) + 1) if r < rc else 0.0

    aevs = []
    for i in range(len(atoms)):
        radial = np.zeros((n_sp, len(shf_r)))
        angular = np.zeros((len(pairs), len(shf_a), len(shf_z)))
        neigh = image_neighbours(atoms, i, cutoff)
        for j, D in neigh:
            r = np.linalg.norm(D)
            radial[SPECIES.index(atoms.numbers[j])] += 0.25 * np.exp(-hp["radial_eta"] * (r - shf_r) ** 2) * fc(r, cutoff)
        close = [(j, D) for j, D in neigh if np.linalg.norm(D) < r_ca]
        for (j, Dj), (k, Dk) in itertools.combinations(close, 2):
            rj, rk = np.linalg.norm(Dj), np.linalg.norm(Dk)
            theta = np.arccos(0.95 * Dj @ Dk / (rj * rk))
            sj, sk = sorted((SPECIES.index(atoms.numbers[j]), SPECIES.index(atoms.numbers[k])))
            f_angle = 2.0 ** (1 - hp["zeta"]) * (1 + np.cos(theta - shf_z)) ** hp["zeta"]
            f_dist = np.exp(-hp["angular_eta"] * ((rj + rk) / 2 - shf_a) ** 2)
            angular[pairs.index((sj, sk))] += np.outer(f_dist, f_angle) * fc(rj, r_ca) * fc(rk, r_ca)
        aevs.append(np.concatenate([radial.ravel(), angular.ravel()]))
    return np.array(aevs)


def rattled_cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[0, 3]] = 28
    cell = atoms.cell.array.copy()
    cell[0] += 0.2 * cell[1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.1, seed=4)
    return atoms


def model(cutoff: float, **hparams) -> ANI:
    torch.manual_seed(0)
    return potentials.build("ani", SPECIES, cutoff, **hparams).double().eval()


@pytest.mark.parametrize(
    "atoms, cutoff, hparams",
    [
        (rattled_cell(), 4.0, {}),  # 3.6 Å cell, smaller than the 4 Å cutoff
        (bulk("Cu", "fcc", a=3.6), 5.0, {}),  # 1-atom cell: all neighbours are images of itself
        (rattled_cell(), 3.0, {"n_radial": 5, "n_angular": 3, "n_angle_sections": 6, "zeta": 4.0}),  # R_ca = cutoff
    ],
)
def test_aev_matches_brute_force(atoms, cutoff, hparams):
    ani = model(cutoff, **hparams)
    got = ani.descriptors(atoms_to_batch(atoms, cutoff, dtype=torch.float64)).detach().numpy()
    expected = brute_force_aev(atoms, cutoff, {**ani.hparams})
    assert got.shape == expected.shape == (len(atoms), ani.aev.length)
    assert np.abs(expected).max() > 0.1 and np.abs(expected[:, ani.aev.radial_length:]).max() > 0.1
    # shifts are stored in float32 before the cast to float64: agreement to ~1e-6 relative
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("n_species", [1, 2, 4])
def test_aev_length_formula(n_species):
    species = [29, 28, 26, 13][:n_species]
    hp = dict(n_radial=7, n_angular=3, n_angle_sections=5)
    ani = potentials.build("ani", species, 5.0, **hp)
    expected = n_species * 7 + n_species * (n_species + 1) // 2 * 3 * 5
    assert ani.aev.length == expected
    assert ani.networks[0][0].in_features == expected
    default = potentials.build("ani", species, 5.1)
    assert default.aev.length == n_species * 16 + n_species * (n_species + 1) // 2 * 32
    # ANI-2x shifts when the cutoff is ANI-2x's 5.1 Å
    np.testing.assert_allclose(default.aev.radial_shifts[:3].numpy(), [0.8, 1.06875, 1.3375], rtol=1e-6)
    np.testing.assert_allclose(default.aev.angular_shifts[:3].numpy(), [0.8, 1.1375, 1.475], rtol=1e-6)
    np.testing.assert_allclose(np.arccos(default.aev.cos_theta_s.numpy()), [0.3927, 1.1781, 1.9635, 2.7489], atol=1e-4)


def test_angular_cutoff_is_min_of_both():
    assert potentials.build("ani", SPECIES, 5.0).aev.angular_cutoff == 3.5
    assert potentials.build("ani", SPECIES, 3.0).aev.angular_cutoff == 3.0
    assert potentials.build("ani", SPECIES, 5.0, angular_cutoff=4.2).aev.angular_cutoff == 4.2
    with pytest.raises(ValueError, match="angular_start"):
        potentials.build("ani", SPECIES, 3.0, angular_start=3.2)


def test_each_species_has_its_own_network():
    atoms = rattled_cell()  # Ni at 0, 3; Cu at 1, 2
    ani = model(4.0)
    batch = atoms_to_batch(atoms, 4.0, dtype=torch.float64)
    before = ani(batch, forces=False)[keys.NODE_ENERGY].detach()
    with torch.no_grad():
        for p in ani.networks[SPECIES.index(29)].parameters():  # the Cu network only
            p.add_(0.05 * torch.randn_like(p))
    after = ani(batch, forces=False)[keys.NODE_ENERGY].detach()
    is_cu = torch.from_numpy(atoms.numbers == 29)
    assert bool((after[is_cu] - before[is_cu]).abs().min() > 1e-6)
    torch.testing.assert_close(after[~is_cu], before[~is_cu], rtol=0, atol=0)


def test_aev_standardization():
    frames = [rattled_cell(), bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))]
    ani = model(4.0)
    batch = atoms_to_batch(frames, 4.0, dtype=torch.float64)
    e_before = ani(batch, forces=False)[keys.ENERGY].detach()
    ani.fit_aev_standardization([batch])
    raw = ani.descriptors(batch)
    x = (raw - ani.aev_mean) / ani.aev_std
    torch.testing.assert_close(x.mean(0), torch.zeros_like(x[0]), rtol=0, atol=1e-10)
    raw_std = raw.std(0, unbiased=False)
    floor = 0.01 * raw_std.max()
    varying = raw_std > floor
    assert int(varying.sum()) > 10 and int((~varying).sum()) > 0
    torch.testing.assert_close(x[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum()), dtype=x.dtype))
    torch.testing.assert_close(ani.aev_std[~varying], floor.expand(int((~varying).sum())))  # tails: not amplified
    assert not torch.allclose(ani(batch, forces=False)[keys.ENERGY], e_before)
    assert set(ani.state_dict()) >= {"aev_mean", "aev_std"}  # saved with the checkpoint


def test_committee_is_vectorized_and_exact():
    """A committee of ANI members runs in one torch.vmap pass (angular edge selection: union_over_vmap)."""
    members = [potentials.build("ani", SPECIES, 4.0, hidden=[16, 8]).double().eval() for _ in range(3)]
    committee = Committee(members, vectorize=True)
    batch = atoms_to_batch([rattled_cell(), bulk("Ni", "fcc", a=3.52)], members[0].cutoff, dtype=torch.float64)
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


def test_short_training_reduces_force_error():
    batch = emt_training_batch()
    torch.manual_seed(0)
    model = potentials.build("ani", ["Cu"], 4.0, hidden=[32, 16]).double()
    losses, zero_model = force_training_losses(model, batch)  # zero_model: the loss of predicting no force
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2 * zero_model, (zero_model, losses[::8])
