"""The batched committee (potentials.committee): equal to K sequential member calls, scores, checkpoints.

Members are small, perturbed float64 models (conftest.build_small) on real periodic
Cu–Ni cells; a learnable pair potential defined here exercises the sequential fallback.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import build_small, cu_ni_rattled

import potentials
from alflow import committee as scores_np
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.base import Potential, UnknownElementError, compute_properties
from potentials.committee import FORCE_DEVIATION, Committee

# every registered architecture; MACE takes ~10 s per member to build (TorchScript), so it is `slow`
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a == "mace" else a for a in potentials.available()]
# must take the vmapped path (the others may fall back, with one warning, and must still be exact)
MUST_VECTORIZE = {"schnet", "painn", "mace"}


class PairMLP(Potential):
    """Learnable many-body test potential: Gaussian pair descriptors → MLP per atom.

    ``item_check=True`` adds a data-dependent Python branch (``.item()``) that torch.vmap cannot trace.
    """

    architecture = "pair_mlp"

    def __init__(self, species, cutoff, *, n_basis: int = 6, item_check: bool = False) -> None:
        super().__init__(species, cutoff)
        self.hparams = dict(n_basis=n_basis, item_check=item_check)
        self.item_check = item_check
        self.eta = torch.nn.Parameter(torch.linspace(0.3, 2.0, n_basis))
        self.embed = torch.nn.Embedding(len(self.species), n_basis)
        self.net = torch.nn.Sequential(torch.nn.Linear(n_basis, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))

    def atomic_energies(self, batch, vectors, species):
        i = batch[keys.EDGE_INDEX][0]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        if self.item_check and d.min().item() < 0.1:  # data-dependent control flow
            raise ValueError("atoms overlap")
        fc = 0.5 * (torch.cos(np.pi * d / self.cutoff) + 1.0)
        g = torch.exp(-self.eta * d[:, None] ** 2) * fc[:, None]
        desc = torch.zeros((species.shape[0], g.shape[1]), dtype=g.dtype).index_add(0, i, g) * self.embed(species)
        return self.net(desc).squeeze(-1)


def pair_members(k: int = 3, item_check: bool = False, species=("Cu", "Ni")) -> list[PairMLP]:
    members = []
    for s in range(k):
        torch.manual_seed(s)
        members.append(PairMLP(list(species), 4.0, item_check=item_check).double().eval())
    return members


def structures():
    """Three periodic structures of different sizes and cells (batch of B = 3)."""
    big = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((1, 1, 2))
    big.numbers[[1, 6]] = 28
    big.rattle(0.06, seed=7)
    return [cu_ni_rattled(seed=3), bulk("Ni", "fcc", a=3.52), big]


def committee_of(arch: str, k: int = 3) -> Committee:
    members = [build_small(arch, seed=s) for s in range(k)]
    for s, m in enumerate(members):  # members differ in their buffers too
        m.e0.copy_(torch.linspace(-1.0, -2.0, len(m.species), dtype=m.e0.dtype) * (1 + 0.1 * s))
        m.scale.fill_(1.0 + 0.2 * s)
        m.shift.fill_(0.05 * s)
    return Committee(members, vectorize=True)


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-10) -> None:
    got, want = got.detach(), want.detach()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:g} × {scale:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_committee_equals_sequential_members(arch):
    """Energies (K, B), forces (K, N, 3), stress (K, B, 3, 3) equal each member's own call, to 1e-10 (float64)."""
    committee = committee_of(arch)
    frames = structures()[:2]  # 4-atom sheared Cu2Ni2 and 1-atom Ni: small, so every architecture is quick
    batch = atoms_to_batch(frames, committee.cutoff, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = committee(batch, forces=True, stress=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == (not committee.vectorized), messages  # a fallback says so, once
    if arch in MUST_VECTORIZE:
        assert committee.vectorized, messages
    assert out[keys.ENERGIES].shape == (3, len(frames))
    assert out[keys.FORCES_COMM].shape == (3, sum(map(len, frames)), 3)
    for k, member in enumerate(committee.members):
        ref = compute_properties(member, batch, forces=True, stress=True)
        assert_close(out[keys.ENERGIES][k], ref[keys.ENERGY])
        assert_close(out[keys.FORCES_COMM][k], ref[keys.FORCES])
        assert_close(out[keys.STRESS_COMM][k], ref[keys.STRESS])
    # the members genuinely differ, so the comparison above is per member
    assert float(out[keys.FORCES_VAR].max()) > 1e-8
    assert_close(out[keys.ENERGY], out[keys.ENERGIES].mean(0))
    assert_close(out[keys.STRESS], out[keys.STRESS_COMM].mean(0))


def test_scores_match_numpy_definitions():
    """Mean, var (ddof 0), eps_i, max eps, energy deviation per atom: as alflow.committee, α applied."""
    committee = committee_of("schnet", k=4)
    committee.set_alpha(1.7)
    frames = structures()
    batch = atoms_to_batch(frames, committee.cutoff, dtype=torch.float64)
    out = {k: v.detach().numpy() for k, v in committee(batch).items()}
    raw = {k: v.detach().numpy() for k, v in committee(batch, calibrated=False).items()}
    start = 0
    for b, atoms in enumerate(frames):
        sl = slice(start, start + len(atoms))
        start += len(atoms)
        ref = scores_np.scores(out[keys.FORCES_COMM][:, sl], out[keys.ENERGIES][:, b], len(atoms), alpha=1.7)
        np.testing.assert_allclose(out[keys.ENERGY][b], ref[keys.ENERGY], rtol=1e-12)
        np.testing.assert_allclose(out[keys.FORCES][sl], ref[keys.FORCES], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out[keys.ENERGY_VAR][b], ref[keys.ENERGY_VAR], rtol=1e-10)
        np.testing.assert_allclose(out[keys.FORCES_VAR][sl], ref[keys.FORCES_VAR], rtol=1e-10, atol=1e-20)
        np.testing.assert_allclose(out[FORCE_DEVIATION][sl], ref[FORCE_DEVIATION], rtol=1e-10)
        np.testing.assert_allclose(out[keys.MAX_FORCE_DEVIATION][b], ref[keys.MAX_FORCE_DEVIATION], rtol=1e-10)
        np.testing.assert_allclose(
            out[keys.ENERGY_DEVIATION_PER_ATOM][b], ref[keys.ENERGY_DEVIATION_PER_ATOM], rtol=1e-10
        )
    # calibration scales deviations by α and variances by α², never the means
    np.testing.assert_allclose(out[keys.FORCES_VAR], 1.7**2 * raw[keys.FORCES_VAR], rtol=1e-12)
    np.testing.assert_allclose(out[keys.MAX_FORCE_DEVIATION], 1.7 * raw[keys.MAX_FORCE_DEVIATION], rtol=1e-12)
    np.testing.assert_allclose(out[keys.FORCES], raw[keys.FORCES], rtol=1e-12)


def test_checkpoint_round_trip(tmp_path):
    """save → load (weights only) gives the same members, α and outputs; the payload holds no code."""
    committee = Committee.build("schnet", 3, ["Cu", "Ni"], 4.0, seed=5, n_atom_basis=8, n_filters=8, n_interactions=1)
    committee.set_alpha(2.5)
    path = potentials.save(committee, tmp_path / "committee.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors + JSON: loadable without unpickling code
    assert raw["kind"] == "committee"
    loaded = potentials.load(path, device="cpu")
    assert isinstance(loaded, Committee)
    assert float(loaded.alpha) == 2.5 and loaded.n_members == 3 and loaded.hparams == committee.hparams
    batch = atoms_to_batch(structures(), 4.0, dtype=torch.float32)
    want, got = committee.eval()(batch, stress=True), loaded(batch, stress=True)
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM, keys.MAX_FORCE_DEVIATION):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_build_seeds_members():
    """Member i is the architecture built under torch.manual_seed(seed + i); the global RNG is untouched."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Committee.build("painn", 2, ["Cu"], 4.0, seed=10, n_atom_basis=8, n_interactions=1, n_rbf=4)
    assert torch.equal(torch.rand(1), before)
    torch.manual_seed(11)
    second = potentials.build("painn", ["Cu"], 4.0, n_atom_basis=8, n_interactions=1, n_rbf=4)
    for p, q in zip(a.members[1].parameters(), second.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.members[0].embedding.weight, a.members[1].embedding.weight)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"species": ["Cu"]}, "species"),
        ({"cutoff": 4.5}, "cutoff"),
        ({"n_filters": 4}, "hparams"),
    ],
)
def test_members_must_agree(change, message):
    kwargs = {"species": ["Cu", "Ni"], "cutoff": 4.0, "n_atom_basis": 8, "n_filters": 8, "n_interactions": 1}
    first = potentials.build("schnet", **kwargs)
    other = potentials.build("schnet", **{**kwargs, **change})
    with pytest.raises(ValueError, match=rf"members\[1\]: {message}"):
        Committee([first, other])
    with pytest.raises(ValueError, match="architecture"):
        Committee([first, potentials.build("painn", ["Cu", "Ni"], 4.0)])
    with pytest.raises(ValueError, match="non-empty"):
        Committee([])


def test_stacked_parameters_follow_member_updates():
    """An optimizer step, an in-place buffer change or load_state_dict(assign=True) on a member is seen
    by the next (cached-stack) evaluation."""
    committee = committee_of("schnet")
    batch = atoms_to_batch(structures(), committee.cutoff, dtype=torch.float64)
    before = committee(batch)[keys.ENERGIES].detach()
    member = committee.members[1]
    opt = torch.optim.SGD(member.parameters(), lr=0.05)
    compute_properties(member, batch, forces=False)[keys.ENERGY].sum().backward()
    opt.step()
    member.shift.add_(0.3)
    # assign=True replaces the Parameter objects themselves
    state = {k: v.clone() for k, v in committee.members[0].state_dict().items()}
    committee.members[2].load_state_dict(state, assign=True)
    after = committee(batch)[keys.ENERGIES].detach()
    assert torch.equal(after[0], before[0])
    assert_close(after[1], compute_properties(member, batch, forces=False)[keys.ENERGY].detach())
    assert float((after[1] - before[1]).abs().min()) > 1e-3
    assert_close(after[2], after[0])


def test_training_gradients_reach_every_member():
    """In training mode a force loss on the committee back-propagates to each member as if called alone."""
    committee = committee_of("painn").train()
    batch = atoms_to_batch(structures(), committee.cutoff, dtype=torch.float64)
    out = committee(batch)
    (out[keys.FORCES_COMM] ** 2).sum().backward()
    for member in committee.members:
        got = [_grad(p).clone() for p in member.parameters()]
        assert any(float(g.abs().max()) > 0 for g in got)
        member.zero_grad(set_to_none=True)
        ref = compute_properties(member, batch, forces=True, create_graph=True)
        (ref[keys.FORCES] ** 2).sum().backward()
        for g, p in zip(got, member.parameters()):
            assert_close(g, _grad(p), rel=1e-9)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """p.grad, zeros for a parameter the loss does not depend on (e.g. the readout bias of a force loss)."""
    return torch.zeros_like(p) if p.grad is None else p.grad


def test_sequential_fallback_warns_once_and_is_exact():
    committee = Committee(pair_members(item_check=True), vectorize=True)
    batch = atoms_to_batch(structures(), 4.0, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"vmap cannot evaluate architecture 'pair_mlp'.*\.item\(\)"):
        out = committee(batch, stress=True)
    assert not committee.vectorized
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        committee(batch)
    vectorized = Committee(pair_members(item_check=False), vectorize=True)
    ref = vectorized(batch, stress=True)
    assert vectorized.vectorized
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM):
        assert_close(out[key], ref[key])


def test_real_errors_are_not_swallowed_by_the_fallback():
    """An error the members raise themselves (here: overlapping atoms) propagates and leaves vmap enabled."""
    committee = Committee(pair_members(item_check=True), vectorize=True)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[1] = atoms.positions[0] + 0.01
    with pytest.raises(ValueError, match="atoms overlap"):
        committee(atoms_to_batch(atoms, 4.0, dtype=torch.float64))
    assert committee._vmap_error is None


def test_vectorize_auto_loops_on_the_cpu_and_both_paths_agree():
    members = pair_members()
    auto, looped = Committee(members), Committee(members, vectorize=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert auto.vectorize == "auto" and not auto.vectorized  # CPU: the loop, whatever the threads
        torch.set_num_threads(2)
        assert not auto.vectorized
    finally:
        torch.set_num_threads(threads)
    assert Committee(members, vectorize=True).vectorized and not looped.vectorized
    batch = atoms_to_batch(structures(), 4.0, dtype=torch.float64)
    ref = Committee(members, vectorize=True)(batch, stress=True)
    for committee in (auto, looped):
        out = committee(batch, stress=True)
        for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM, keys.MAX_FORCE_DEVIATION):
            assert_close(out[key], ref[key])
    with pytest.raises(ValueError, match="vectorize"):
        Committee(members, vectorize="yes")


@pytest.mark.parametrize("vectorize", [True, False])
def test_unknown_element_is_named(vectorize):
    committee = Committee(pair_members(species=("Cu",)), vectorize=vectorize)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[2] = 79
    with pytest.raises(UnknownElementError, match=r"Au \(Z=79\)"):
        committee(atoms_to_batch(atoms, 4.0, dtype=torch.float64))


def test_energy_only_and_no_grad():
    """forces=False gives energies and energy scores only; under no_grad forces still come out."""
    committee = committee_of("schnet")
    batch = atoms_to_batch(structures(), committee.cutoff, dtype=torch.float64)
    energy_only = committee(batch, forces=False)
    assert keys.FORCES not in energy_only and keys.MAX_FORCE_DEVIATION not in energy_only
    with torch.no_grad():
        out = committee(batch)
    assert_close(out[keys.ENERGIES], energy_only[keys.ENERGIES])
    assert out[keys.FORCES_COMM].shape[0] == 3


@pytest.mark.gpu
def test_cuda_matches_cpu():
    committee = committee_of("schnet")
    committee.vectorize = "auto"  # on CUDA: the batched path
    frames = structures()
    cpu = committee(atoms_to_batch(frames, committee.cutoff, dtype=torch.float64), stress=True)
    gpu = committee.to("cuda")(atoms_to_batch(frames, committee.cutoff, dtype=torch.float64, device="cuda"), stress=True)
    assert committee.vectorized
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.STRESS_COMM):
        assert_close(gpu[key].cpu(), cpu[key], rel=1e-9)
