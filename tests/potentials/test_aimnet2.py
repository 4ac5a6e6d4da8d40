"""AIMNet2-specific checks: charge conservation per structure, the DSF Coulomb option (changes the
energy, forces stay -dE/dr, continuous at the cutoff), committee vmap, checkpoints and a short training run.
The shared contract (forces, stress, invariances, float32, 1-atom cell) is in test_contract.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from torch.func import functional_call, stack_module_state, vmap

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from alflow.neighbors import edge_vectors
from potentials.aimnet2 import CHARGE, AIMNet2, dsf_coulomb

SMALL = {"n_features": 8, "n_rbf": 6, "n_vector": 4, "hidden": [32], "aim_size": 16}
CUTOFF = 4.0


def small_model(seed: int = 0, perturb: float = 0.1, **overrides) -> AIMNet2:
    """A small float64 AIMNet2 (Cu, Ni) with perturbed weights, in eval mode."""
    torch.manual_seed(seed)
    model = potentials.build("aimnet2", ["Cu", "Ni"], CUTOFF, **{**SMALL, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.double().eval()


def structures() -> list[Atoms]:
    """Rattled Cu2Ni2 (4 atoms, cell < cutoff), 1-atom Ni, rattled Cu6Ni2."""
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.numbers[[1, 3]] = 28
    a.rattle(0.08, seed=1)
    c = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((1, 1, 2))
    c.numbers[[0, 5]] = 28
    c.rattle(0.06, seed=2)
    return [a, bulk("Ni", "fcc", a=3.52), c]


def energy(model: AIMNet2, atoms: Atoms) -> float:
    batch = atoms_to_batch([atoms], model.cutoff, dtype=torch.float64)
    return float(model(batch, forces=False)[keys.ENERGY][0].detach())


def test_charges_sum_to_total_charge_per_structure():
    model = small_model()
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    q = model.partial_charges(batch)
    sums = torch.zeros(3, dtype=q.dtype).index_add(0, batch[keys.BATCH], q)
    torch.testing.assert_close(sums, torch.zeros(3, dtype=q.dtype), rtol=0, atol=1e-10)
    assert q.abs().max() > 1e-3  # charges are not trivially zero
    total = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    charged = model.partial_charges({**batch, CHARGE: total})
    sums = torch.zeros(3, dtype=q.dtype).index_add(0, batch[keys.BATCH], charged)
    torch.testing.assert_close(sums, total, rtol=0, atol=1e-6)
    # the total charge changes the energy of that structure (and only of that one)
    e_neutral = model(batch, forces=False)[keys.ENERGY].detach()
    e_charged = model({**batch, CHARGE: total}, forces=False)[keys.ENERGY].detach()
    assert (e_charged - e_neutral)[[0, 2]].abs().min() > 1e-4
    assert e_charged[1] == e_neutral[1]
    float32 = copy.deepcopy(model).float()
    q32 = float32.partial_charges({**atoms_to_batch(structures(), CUTOFF, dtype=torch.float32), CHARGE: total.float()})
    sums = torch.zeros(3).index_add(0, batch[keys.BATCH], q32)
    torch.testing.assert_close(sums, total.float(), rtol=0, atol=1e-5)


def test_coulomb_changes_energy_and_keeps_forces_conservative():
    plain = small_model()
    model = small_model(coulomb=True)
    model.load_state_dict(plain.state_dict())
    atoms = structures()[0]
    assert abs(energy(model, atoms) - energy(plain, atoms)) > 1e-3
    batch = atoms_to_batch([atoms], CUTOFF, dtype=torch.float64)
    forces = model(batch)[keys.FORCES].detach().numpy()
    h = 1e-4
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(energy(model, plus) - energy(model, minus)) / (2 * h)
        assert abs(forces[atom, axis] - fd) <= 1e-6 * np.abs(forces).max(), (atom, axis, forces[atom, axis], fd)
    # node energies = scale · out + shift + E0 + Coulomb(final charges)
    with torch.no_grad():
        model.scale.fill_(2.5)
        model.shift.fill_(0.1)
    idx_i, idx_j = batch[keys.EDGE_INDEX]
    vectors = edge_vectors(batch[keys.POSITIONS], batch[keys.CELL], idx_i, idx_j, batch[keys.SHIFTS], batch[keys.BATCH])
    species = model.species_index(batch[keys.NUMBERS])
    d = vectors.norm(dim=-1)
    expected = 2.5 * model.atomic_energies(batch, vectors, species) + 0.1 + model.e0[species]
    expected = expected + dsf_coulomb(model.partial_charges(batch), d, idx_i, idx_j, CUTOFF, model.coulomb_alpha)
    torch.testing.assert_close(model.node_energies(batch, vectors, species), expected, rtol=1e-12, atol=1e-12)


def test_dsf_pair_energy_and_force_vanish_at_cutoff():
    q = torch.tensor([0.7, -0.4], dtype=torch.float64)
    idx_i, idx_j = torch.tensor([0, 1]), torch.tensor([1, 0])
    no_pairs = dsf_coulomb(q, torch.zeros(0, dtype=torch.float64), idx_i[:0], idx_j[:0], 5.0, 0.2)
    assert float(no_pairs.sum()) < 0  # the DSF self term
    for alpha in (0.0, 0.2):
        d = torch.full((2,), 5.0, dtype=torch.float64, requires_grad=True)
        e = dsf_coulomb(q, d, idx_i, idx_j, 5.0, alpha)
        (grad,) = torch.autograd.grad(e.sum(), d)
        assert float(grad.abs().max()) < 1e-12  # shifted force: zero force at the cutoff
        alone = dsf_coulomb(q, d[:0].detach(), idx_i[:0], idx_j[:0], 5.0, alpha)
        torch.testing.assert_close(e.detach(), alone, rtol=0, atol=1e-14)  # shifted energy: the pair term is 0 at the cutoff
        near = dsf_coulomb(q, torch.full((2,), 2.5, dtype=torch.float64), idx_i, idx_j, 5.0, alpha)
        assert float(near.sum()) < float(alone.sum()) - 0.1  # opposite charges attract inside the cutoff


def test_energy_is_continuous_as_an_atom_leaves_the_cutoff():
    """Atom 2 crosses the cutoff of atom 0 (its only neighbour): energy and forces do not jump."""
    model = small_model(coulomb=True)
    results = []
    for y in (CUTOFF - 1e-6, CUTOFF + 1e-6):
        atoms = Atoms("Cu2Ni", positions=[[0, 0, 0], [2.4, 0.3, 0], [0, y, 0]], pbc=False)
        out = model(atoms_to_batch([atoms], CUTOFF, dtype=torch.float64))
        results.append((float(out[keys.ENERGY][0].detach()), out[keys.FORCES].detach()))
    (e_in, f_in), (e_out, f_out) = results
    assert abs(e_in - e_out) < 1e-6, (e_in, e_out)
    assert float((f_in - f_out).abs().max()) < 1e-4 * max(1.0, float(f_in.abs().max()))
    assert float(f_in.abs().max()) > 1e-3  # the pair (0, 1) inside the cutoff does interact


def test_vmap_over_stacked_members_matches_each_member():
    members = [small_model(seed=s, coulomb=True) for s in (0, 5)]
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    params, _ = stack_module_state(members)
    buffers = dict(members[0].named_buffers())
    skeleton = copy.deepcopy(members[0]).to("meta")

    def member_energy(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(skeleton, (p, buffers), (batch,), {"forces": False})[keys.ENERGY]

    together = vmap(member_energy)(params)
    one_by_one = torch.stack([m(batch, forces=False)[keys.ENERGY] for m in members])
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)
    assert (one_by_one[0] - one_by_one[1]).abs().max() > 1e-3


def test_hyperparameters_and_checkpoint_roundtrip(tmp_path):
    model = small_model(coulomb=True)
    assert model.hparams["hidden"] == [32] and model.hparams["coulomb"] is True
    path = potentials.save(model, tmp_path / "aimnet2.pt")
    loaded = potentials.load(path, device="cpu")
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    torch.testing.assert_close(loaded(batch)[keys.FORCES], model(batch)[keys.FORCES], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n_passes"):
        AIMNet2(["Cu"], 5.0, n_passes=1)
    with pytest.raises(ValueError, match="hidden"):
        AIMNet2(["Cu"], 5.0, hidden=[])
    with pytest.raises(ValueError, match="allowed: .*coulomb"):
        potentials.build("aimnet2", ["Cu"], 5.0, n_feature=8)


def test_short_training_lowers_the_force_loss():
    rng = np.random.default_rng(0)
    frames = []
    for k in range(8):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.05 * rng.standard_normal(), cubic=True)
        atoms.rattle(0.1, seed=k)
        atoms.calc = EMT()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        frames.append(atoms)
    batch = atoms_to_batch(frames, CUTOFF, dtype=torch.float32)
    target = torch.tensor(np.concatenate([a.arrays["REF_forces"] for a in frames]), dtype=torch.float32)
    torch.manual_seed(0)
    model = potentials.build("aimnet2", ["Cu"], CUTOFF, **SMALL).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (model(batch)[keys.FORCES] - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.5 * losses[0], losses
