"""SAKE-specific checks: the neighbourhood softmax (sums to 1 per centre and head, no overflow), the cutoff
weighting (continuous energy as a neighbour leaves), committee vmap over stacked members (energies and
forces), checkpoints and a short training run. The shared contract is in test_contract.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from torch.func import functional_call, grad, stack_module_state, vmap

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from alflow.neighbors import edge_vectors
from potentials.layers import scatter_sum
from potentials.sake import SAKE, neighbourhood_softmax

SMALL = {"hidden_features": 16, "n_layers": 2, "n_heads": 2, "n_rbf": 8}
CUTOFF = 4.0


def small_model(seed: int = 0, perturb: float = 0.1) -> SAKE:
    """A small float64 SAKE (Cu, Ni) with perturbed weights, in eval mode."""
    torch.manual_seed(seed)
    model = potentials.build("sake", ["Cu", "Ni"], CUTOFF, **SMALL)
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


def pair_vectors(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    idx_i, idx_j = batch[keys.EDGE_INDEX]
    return edge_vectors(batch[keys.POSITIONS], batch[keys.CELL], idx_i, idx_j, batch[keys.SHIFTS], batch[keys.BATCH])


def test_attention_sums_to_one_over_each_centres_neighbours():
    model = small_model()
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    idx_i = batch[keys.EDGE_INDEX][0]
    n_atoms = batch[keys.POSITIONS].shape[0]
    weights = model.attention_weights(batch, pair_vectors(batch))
    assert len(weights) == SMALL["n_layers"]
    for w in weights:
        assert w.shape == (idx_i.shape[0], SMALL["n_heads"])
        assert bool((w >= 0).all())
        torch.testing.assert_close(scatter_sum(w, idx_i, n_atoms), torch.ones(n_atoms, SMALL["n_heads"], dtype=w.dtype))
        assert float(w.detach().std()) > 1e-3  # not uniform: distance and features matter
    # the cutoff weight: the farthest neighbours carry little weight, the nearest most
    d = pair_vectors(batch).norm(dim=-1)
    far, near = d > 0.85 * CUTOFF, d < 2.7
    assert far.any() and near.any()
    assert weights[0][far].mean() < 0.1 * weights[0][near].mean()


def test_neighbourhood_softmax_is_stable_and_per_centre():
    idx_i = torch.tensor([0, 0, 0, 2, 2])
    logits = torch.tensor([[1e4, 0.0], [1e4 - 1.0, 1.0], [-1e4, 2.0], [3.0, -5e3], [3.0, -5e3]], dtype=torch.float32)
    w = neighbourhood_softmax(logits, idx_i, 3)
    assert bool(torch.isfinite(w).all())
    expected = torch.cat([torch.softmax(logits[:3], dim=0), torch.softmax(logits[3:], dim=0)])
    torch.testing.assert_close(w, expected)
    # a shift of one centre's logits changes nothing
    shifted = logits.clone()
    shifted[3:] += 100.0
    torch.testing.assert_close(neighbourhood_softmax(shifted, idx_i, 3), w)


def test_energy_is_continuous_as_an_atom_leaves_the_cutoff():
    """Atom 2 crosses the cutoff of atom 0 (its only neighbour): energy and forces do not jump."""
    model = small_model()
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
    """torch.func.vmap over 2 members' stacked parameters (as a committee does): same energies and forces."""
    members = [small_model(seed=s) for s in (0, 5)]
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    params, _ = stack_module_state(members)
    buffers = dict(members[0].named_buffers())
    skeleton = copy.deepcopy(members[0]).to("meta")

    def member_energy(p: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        inputs = {**batch, keys.POSITIONS: positions}
        return functional_call(skeleton, (p, buffers), (inputs,), {"forces": False})[keys.ENERGY]

    positions = batch[keys.POSITIONS]
    together = vmap(member_energy, in_dims=(0, None))(params, positions)
    one_by_one = torch.stack([m(batch, forces=False)[keys.ENERGY] for m in members]).detach()
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)
    assert (one_by_one[0] - one_by_one[1]).abs().max() > 1e-3
    forces = -vmap(grad(lambda p, x: member_energy(p, x).sum(), argnums=1), in_dims=(0, None))(params, positions)
    reference = torch.stack([m(batch)[keys.FORCES] for m in members])
    torch.testing.assert_close(forces, reference, rtol=0, atol=1e-12)


def test_hyperparameters_and_checkpoint_roundtrip(tmp_path):
    model = small_model()
    assert model.hparams == SMALL
    loaded = potentials.load(potentials.save(model, tmp_path / "sake.pt"), device="cpu")
    batch = atoms_to_batch(structures(), CUTOFF, dtype=torch.float64)
    torch.testing.assert_close(loaded(batch)[keys.FORCES], model(batch)[keys.FORCES], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n_heads"):
        SAKE(["Cu"], 5.0, n_heads=0)


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
    model = potentials.build("sake", ["Cu"], CUTOFF, **SMALL).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (model(batch)[keys.FORCES] - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.5 * losses[0], losses
