"""The shallow committee (potentials/shallow.py) against the contract, for every architecture with a readout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.committee import Committee
from potentials.registry import CheckpointError
from potentials.shallow import ShallowCommittee, supported
from conftest import build_small, cu_ni_rattled

SUPPORTED = supported()


def test_every_registry_architecture_is_classified():
    """The architectures with one additive readout declare it (a new one must state it or stay unsupported)."""
    assert set(SUPPORTED) == {"schnet", "painn", "dtnn", "sake", "tensornet", "aimnet2"}
    with pytest.raises(ValueError, match="declares no readout.*schnet"):
        ShallowCommittee(build_small("physnet"), 4)


def predict(model, frames, stress=True) -> dict[str, np.ndarray]:
    batch = atoms_to_batch(frames, model.cutoff, dtype=torch.float64)
    out = model(batch, forces=True, stress=stress)
    return {k: v.detach().double().numpy() for k, v in out.items()}


def close(got, ref, rel=1e-9):
    ref = np.asarray(ref, dtype=float)
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * max(np.abs(ref).max(initial=0.0), 1e-300))


@pytest.fixture(params=SUPPORTED)
def shallow(request) -> ShallowCommittee:
    return ShallowCommittee(build_small(request.param), 3, seed=1).eval()


def test_heads_forces_are_each_heads_gradient(shallow):
    """forces_comm[k] = -dE^k/dr by finite differences; the heads differ; mean and keys as Committee's."""
    atoms = cu_ni_rattled()
    out = predict(shallow, atoms)
    assert out[keys.ENERGIES].shape == (3, 1) and out[keys.FORCES_COMM].shape == (3, 4, 3)
    assert out[keys.STRESS_COMM].shape == (3, 1, 3, 3)
    assert np.ptp(out[keys.ENERGIES][:, 0]) > 1e-6 * np.abs(out[keys.ENERGIES]).max()  # heads initialised differently
    assert out[keys.MAX_FORCE_DEVIATION][0] > 0
    close(out[keys.FORCES], out[keys.FORCES_COMM].mean(0), 1e-12)
    h = 1e-5
    for atom, axis in ((0, 0), (2, 1)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(predict(shallow, plus, False)[keys.ENERGIES][:, 0] - predict(shallow, minus, False)[keys.ENERGIES][:, 0]) / (2 * h)
        close(out[keys.FORCES_COMM][:, atom, axis], fd, 1e-6)


def test_rotation_invariance(shallow, rotation):
    atoms = cu_ni_rattled()
    ref = predict(shallow, atoms)
    rotated = Atoms(atoms.numbers, positions=atoms.positions @ rotation.T, cell=atoms.cell.array @ rotation.T, pbc=True)
    got = predict(shallow, rotated)
    close(got[keys.ENERGIES], ref[keys.ENERGIES])
    close(got[keys.FORCES_COMM], ref[keys.FORCES_COMM] @ rotation.T)
    close(got[keys.MAX_FORCE_DEVIATION], ref[keys.MAX_FORCE_DEVIATION])
    close(got[keys.STRESS][0], rotation @ ref[keys.STRESS][0] @ rotation.T)


def test_batch_equals_one_by_one(shallow, three_structures):
    together = predict(shallow, three_structures)
    singles = [predict(shallow, a) for a in three_structures]
    close(together[keys.ENERGIES], np.concatenate([s[keys.ENERGIES] for s in singles], axis=1), 1e-12)
    close(together[keys.FORCES_COMM], np.concatenate([s[keys.FORCES_COMM] for s in singles], axis=1), 1e-12)
    close(together[keys.MAX_FORCE_DEVIATION], np.concatenate([s[keys.MAX_FORCE_DEVIATION] for s in singles]), 1e-12)


def test_mean_mode_same_mean_one_backward(shallow, three_structures):
    """forces_mode mean: the same energies and mean forces; deviation = α · per-atom energy spread."""
    heads = predict(shallow, three_structures)
    shallow.forces_mode = "mean"
    shallow.set_alpha(2.0)
    mean = predict(shallow, three_structures)
    close(mean[keys.ENERGIES], heads[keys.ENERGIES], 1e-12)
    close(mean[keys.FORCES], heads[keys.FORCES], 1e-10)
    close(mean[keys.STRESS], heads[keys.STRESS], 1e-10)
    batch = atoms_to_batch(three_structures, shallow.cutoff, dtype=torch.float64)
    nodes = shallow.head_energies(batch, False, False)[1]
    close(mean["force_deviation"], 2.0 * nodes.std(0, correction=0).detach().numpy(), 1e-12)


def test_checkpoint_round_trip(shallow, tmp_path, three_structures):
    shallow.set_alpha(1.7)
    ref = predict(shallow, three_structures)
    path = potentials.save(shallow, tmp_path / "shallow.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "shallow"
    loaded = potentials.load(path, device="cpu")
    assert isinstance(loaded, ShallowCommittee) and loaded.n_members == 3 and float(loaded.alpha) == pytest.approx(1.7)
    got = predict(loaded, three_structures)
    for key in (keys.ENERGIES, keys.FORCES_COMM, keys.MAX_FORCE_DEVIATION, keys.STRESS):
        close(got[key], ref[key], 1e-12)


def test_checkpoint_with_wrong_heads_is_refused(tmp_path):
    sc = ShallowCommittee(build_small("schnet"), 3)
    path = potentials.save(sc, tmp_path / "s.pt")
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = payload["metadata"].replace('"heads": 3', '"heads": 5')
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        potentials.load(tmp_path / "bad.pt", device="cpu")


def test_same_keys_as_committee(three_structures):
    full = Committee([build_small("schnet", seed=s) for s in range(3)])
    shallow = ShallowCommittee(build_small("schnet"), 3).eval()
    assert set(predict(full, three_structures)) == set(predict(shallow, three_structures))


def test_batched_vjp_equals_k_backward_passes(three_structures):
    """The accelerator path (one batched VJP over the heads) gives the CPU path's forces and stress."""
    sc = ShallowCommittee(build_small("painn"), 3, seed=2).eval()
    sc.batched_vjp = False
    loop = predict(sc, three_structures)
    sc.batched_vjp = True
    batched = predict(sc, three_structures)
    assert sc._batched_ok  # no fallback: the batched path really ran
    for key in (keys.FORCES_COMM, keys.STRESS_COMM, keys.MAX_FORCE_DEVIATION):
        close(batched[key], loop[key], 1e-12)


def test_engines_read_a_shallow_committee(tmp_path):
    """The ASE calculator returns the committee results, and i-PI's α reader finds the stored α."""
    from alflow.calculator import ENERGIES_COMM, AlflowCalculator
    from alflow.explore.ipi import load_alpha

    sc = ShallowCommittee(build_small("schnet"), 3, seed=4).eval()
    sc.set_alpha(2.5)
    path = potentials.save(sc, tmp_path / "shallow.pt")
    assert load_alpha(path) == pytest.approx(2.5)
    atoms = cu_ni_rattled()
    atoms.calc = AlflowCalculator(path, device="cpu")
    forces = atoms.get_forces()
    ref = predict(sc, atoms)
    close(forces, ref[keys.FORCES], 1e-6)
    assert atoms.calc.results[ENERGIES_COMM].shape == (3,)
    assert atoms.calc.results[keys.MAX_FORCE_DEVIATION] == pytest.approx(float(ref[keys.MAX_FORCE_DEVIATION][0]), rel=1e-6)


def test_batched_engine_runs_a_shallow_committee(tmp_path):
    """Two walkers in the batched engine: every frame scored by the heads' spread."""
    from ase.build import bulk
    from ase.io import read

    from alflow.explore.ase_md import WalkerSpec
    from alflow.explore.batched import run_batched
    from alflow.explore.frames import DONE

    torch.manual_seed(0)
    sc = ShallowCommittee.build("schnet", 3, ["Cu"], 4.0, seed=0, n_atom_basis=16, n_filters=16, n_interactions=2,
                                n_rbf=8).eval()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    specs = [WalkerSpec(atoms=atoms, steps=10, stride=5, seed=s, name=f"w{s}") for s in range(2)]
    results = run_batched(specs, sc, tmp_path, upper=1e3, progress=False, device="cpu")
    assert [r.status for r in results] == [DONE, DONE]
    frames = read(results[0].trajectory, ":")
    assert len(frames) == 3 and all(f.info[keys.MAX_FORCE_DEVIATION] > 0 for f in frames)


def test_spread_false_gives_the_mean_forces_and_no_deviation(three_structures):
    """heads mode with spread=False: the same energies, mean forces and stress, NaN force deviations."""
    sc = ShallowCommittee(build_small("schnet"), 3, seed=2).eval()
    batch = atoms_to_batch(three_structures, sc.cutoff, dtype=torch.float64)
    full = sc(batch, forces=True, stress=True)
    cheap = sc(batch, forces=True, stress=True, spread=False)
    for key in (keys.ENERGIES, keys.FORCES, keys.STRESS, keys.ENERGY_DEVIATION_PER_ATOM):
        close(cheap[key].detach().numpy(), full[key].detach().numpy(), 1e-10)
    assert torch.isnan(cheap[keys.MAX_FORCE_DEVIATION]).all() and torch.isnan(cheap["force_deviation"]).all()
    assert torch.isfinite(full[keys.MAX_FORCE_DEVIATION]).all() and full[keys.MAX_FORCE_DEVIATION].max() > 0


def test_batched_engine_asks_for_the_spread_only_on_recorded_steps(tmp_path):
    """Sparse spread in the batched engine: the trajectories and every recorded deviation equal an every-step
    run's, with the heads' K backward passes on 1 step in 5 (+ the start) instead of every step."""
    from ase.build import bulk
    from ase.io import read

    from alflow.explore import batched
    from alflow.explore.ase_md import WalkerSpec

    sc = ShallowCommittee.build("schnet", 3, ["Cu"], 4.0, seed=0, n_atom_basis=16, n_filters=16, n_interactions=2,
                                n_rbf=8).double().eval()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    specs = [WalkerSpec(atoms=atoms, steps=20, stride=5, seed=s, name=f"w{s}") for s in range(2)]
    calls = []
    original = batched.ForceCall.__call__

    def counting(self, state):
        out = original(self, state)
        calls.append(self.want_spread or not self.sparse)
        return out

    batched.ForceCall.__call__ = counting
    try:
        sparse = batched.run_batched(specs, sc, tmp_path / "sparse", upper=1e3, progress=False, device="cpu")
        n_sparse = (sum(calls), len(calls))
        calls.clear()
        sc.sparse_spread = False  # the instance opts out: every step pays for the spread
        dense = batched.run_batched(specs, sc, tmp_path / "dense", upper=1e3, progress=False, device="cpu")
        n_dense = (sum(calls), len(calls))
    finally:
        batched.ForceCall.__call__ = original
        del sc.sparse_spread
    assert n_dense == (21, 21) and n_sparse == (5, 21)  # start + steps 5, 10, 15, 20
    for a, b in zip(sparse, dense):
        fa, fb = read(a.trajectory, ":"), read(b.trajectory, ":")
        assert len(fa) == len(fb) == 5
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-10)
            assert x.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(y.info[keys.MAX_FORCE_DEVIATION], rel=1e-8)
            assert np.isfinite(x.info[keys.MAX_FORCE_DEVIATION])


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "one-by-one"])
def test_ase_engine_asks_for_the_spread_only_on_recorded_steps(tmp_path, lockstep):
    """Sparse spread in the ASE engine: the same frames and recorded deviations as an every-step run, with the
    heads' K backward passes on the start and every stride-th step only."""
    from ase.build import bulk
    from ase.io import read

    from alflow.explore.ase_md import WalkerSpec, run_walkers
    from alflow.explore.evaluator import ModelEvaluator
    from alflow.explore.frames import DONE

    sc = ShallowCommittee.build("schnet", 3, ["Cu"], 4.0, seed=0, n_atom_basis=16, n_filters=16, n_interactions=2,
                                n_rbf=8).double().eval()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    specs = [WalkerSpec(atoms=atoms, steps=20, stride=5, seed=s, name=f"w{s}") for s in range(2)]
    sparse_eval = ModelEvaluator(sc, device="cpu")
    sparse = run_walkers(specs, sparse_eval, tmp_path / "sparse", upper=1e3, batched=lockstep, progress=False,
                         device="cpu")
    dense_eval = ModelEvaluator(sc, device="cpu")
    dense_eval.sparse = False  # this evaluator pays for the spread on every step
    dense = run_walkers(specs, dense_eval, tmp_path / "dense", upper=1e3, batched=lockstep, progress=False,
                        device="cpu")
    runs = 1 if lockstep else 2  # lockstep: one call serves both walkers
    assert dense_eval.spread_calls == dense_eval.calls == 21 * runs  # the start + 20 steps
    assert sparse_eval.calls == 21 * runs and sparse_eval.spread_calls == 5 * runs  # start + steps 5, 10, 15, 20
    for a, b in zip(sparse, dense):
        assert a.status == b.status == DONE
        fa, fb = read(a.trajectory, ":"), read(b.trajectory, ":")
        assert len(fa) == len(fb) == 5
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-10)
            assert np.isfinite(x.info[keys.MAX_FORCE_DEVIATION])
            assert x.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(y.info[keys.MAX_FORCE_DEVIATION], rel=1e-8)
        # the worst deviation seen: over the recorded steps (sparse) vs over every step (dense)
        recorded = max(x.info[keys.MAX_FORCE_DEVIATION] for x in fa)
        assert a.max_force_deviation == pytest.approx(recorded, rel=1e-8)
        assert a.max_force_deviation <= b.max_force_deviation * (1 + 1e-8)


def test_stop_rule_carries_the_last_look_over_steps_without_a_spread():
    """A NaN deviation (no spread this step) neither ends nor restarts a run above ``upper``."""
    from alflow.explore.frames import DONE, UNCERTAIN, StopRule

    rule = StopRule(upper=0.5, patience=3, min_distance=0.0)
    scores = lambda dev: {keys.MAX_FORCE_DEVIATION: dev, "forces": np.zeros((2, 3)), "energy": 0.0}  # noqa: E731
    assert rule.update(scores(float("nan")))[0] == DONE and rule.above == 0  # nothing seen yet
    assert rule.update(scores(0.9))[0] == DONE and rule.above == 1
    assert rule.update(scores(float("nan")))[0] == DONE and rule.above == 2  # counts on
    assert rule.update(scores(float("nan")))[0] == UNCERTAIN
    rule = StopRule(upper=0.5, patience=3, min_distance=0.0)
    rule.update(scores(0.9))
    rule.update(scores(0.1))  # the next look says it came back
    assert rule.update(scores(float("nan")))[0] == DONE and rule.above == 0
    assert rule.worst == pytest.approx(0.9)
