"""ASE walkers: batched lockstep MD equals one-by-one MD, statuses, scores on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.io import read

from alflow import keys
from alflow.explore.ase_md import DONE, EXPLODED, UNCERTAIN, WalkerSpec, run_walkers
from alflow.explore.evaluator import ModelEvaluator
from potentials.committee import Committee


@pytest.fixture(scope="module")
def committee() -> Committee:
    torch.manual_seed(0)
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16, n_interactions=2, n_rbf=10)
    model.double()
    # a physically sensible scale so MD stays stable: small per-atom outputs around a bound crystal
    for member in model.members:
        member.scale.fill_(0.05)
    return model


def cu(n: int = 1):
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)


def specs(atoms, ensembles=("nvt-langevin", "nvt-svr", "npt-iso", "nve"), steps=12):
    out = []
    for k, ensemble in enumerate(ensembles):
        out.append(WalkerSpec(atoms=atoms, ensemble=ensemble, temperature=[300.0, 600.0], steps=steps, stride=4, seed=k,
                              pressure=0.0 if ensemble.startswith("npt") else None, name=f"w{k}-{ensemble}"))
    return out


def test_batched_walkers_equal_one_by_one(tmp_path, committee):
    walkers = specs(cu(1))
    evaluator = ModelEvaluator(committee, device="cpu")
    batched = run_walkers(walkers, evaluator, tmp_path / "batched", upper=10.0, progress=False)
    calls_batched = evaluator.calls
    sequential = run_walkers(walkers, committee, tmp_path / "sequential", upper=10.0, batched=False, progress=False, device="cpu")
    assert [r.status for r in batched] == [DONE] * 4, [r.message for r in batched]
    assert [r.status for r in sequential] == [DONE] * 4
    # one model call per step for all walkers together (+ the first evaluation)
    assert calls_batched <= 12 + 2
    for a, b in zip(batched, sequential):
        fa, fb = read(a.trajectory, ":"), read(b.trajectory, ":")
        assert len(fa) == len(fb) == 4  # steps 0, 4, 8, 12
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(x.positions, y.positions, atol=1e-8)
            np.testing.assert_allclose(x.info[keys.MAX_FORCE_DEVIATION], y.info[keys.MAX_FORCE_DEVIATION], rtol=1e-8)
    summary = json.loads((tmp_path / "batched" / "walkers.json").read_text())
    assert {w["status"] for w in summary} == {DONE}


def test_scores_written_with_frames(tmp_path, committee):
    [result] = run_walkers(specs(cu(1), ("nvt-langevin",)), committee, tmp_path, upper=10.0, progress=False)
    frames = read(result.trajectory, ":")
    for frame in frames:
        assert frame.info[keys.MAX_FORCE_DEVIATION] > 0
        assert frame.info[keys.ENERGY_DEVIATION_PER_ATOM] >= 0
        assert frame.arrays["force_deviation"].shape == (len(frame),)
        assert frame.info[keys.WALKER] == result.name
    # the ramp moved the target temperature from 300 K to 600 K
    assert frames[0].info["temperature_K"] == pytest.approx(300.0)
    assert frames[-1].info["temperature_K"] == pytest.approx(600.0)


def test_uncertain_and_exploded_walkers_stop_without_stopping_others(tmp_path, committee):
    atoms = cu(1)
    walkers = specs(atoms, ("nvt-langevin", "nvt-langevin"), steps=30)
    results = run_walkers(walkers[:1], committee, tmp_path / "u", upper=1e-9, patience=3, progress=False)
    # the perfect crystal at step 0 has zero force deviation by symmetry; steps 1, 2, 3 are above
    assert results[0].status == UNCERTAIN and results[0].steps == 3
    squeezed = atoms.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.3, 0.0, 0.0]
    mixed = [WalkerSpec(atoms=squeezed, steps=30, name="bad"), WalkerSpec(atoms=atoms, steps=30, name="good")]
    results = run_walkers(mixed, committee, tmp_path / "x", upper=10.0, min_distance=0.5, progress=False)
    assert results[0].status == EXPLODED and "apart" in results[0].message
    assert results[1].status == DONE and results[1].steps == 30
    assert len(read(results[0].trajectory, ":")) == 1  # the exploding frame is kept for the record


def test_nve_conserves_energy(tmp_path, committee):
    atoms = cu(1)
    spec = WalkerSpec(atoms=atoms, ensemble="nve", temperature=300.0, timestep=1.0, steps=200, stride=10, name="nve")
    [result] = run_walkers([spec], committee.members[0], tmp_path, upper=10.0, progress=False)
    assert result.status == DONE
    frames = read(result.trajectory, ":")
    total = []
    for f in frames:
        kinetic = 0.5 * np.sum(f.get_masses()[:, None] * f.get_velocities() ** 2)
        total.append(f.info["pred_energy"] + kinetic)
    drift_per_atom = (max(total) - min(total)) / len(atoms)
    assert drift_per_atom < 1e-4, drift_per_atom  # eV/atom over 0.2 ps


def test_npt_changes_the_cell(tmp_path, committee):
    spec = WalkerSpec(atoms=cu(1), ensemble="npt-aniso", temperature=500.0, pressure=5.0, steps=40, stride=40, name="npt")
    [result] = run_walkers([spec], committee, tmp_path, upper=10.0, progress=False)
    assert result.status == DONE, result.message
    first, last = read(result.trajectory, ":")
    assert not np.allclose(first.cell.array, last.cell.array)


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="pressure"):
        WalkerSpec(atoms=cu(1), ensemble="npt-iso")
    with pytest.raises(ValueError, match="ensemble"):
        WalkerSpec(atoms=cu(1), ensemble="nvt-magic")
    slab = cu(1)
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="3D-periodic"):
        WalkerSpec(atoms=slab, ensemble="npt-iso", pressure=0.0)
    assert units.fs > 0


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(timestep=float("inf")), dict(element="Ag"),
                                 dict(positions=float("nan"))])
def test_one_broken_walker_does_not_end_the_lockstep_batch(tmp_path, committee, bad):
    """Issue 16 item 6: a walker that blows up (NaN temperature, infinite timestep, an element the
    committee does not know, NaN positions) fails alone; the healthy ones in the same batch finish."""
    atoms = cu(1)
    broken = atoms.copy()
    settings = {k: v for k, v in bad.items() if k in ("temperature", "timestep")}
    if "element" in bad:
        broken[0].symbol = bad["element"]
    if "positions" in bad:
        broken.positions[2] = bad["positions"]
    walkers = [WalkerSpec(atoms=atoms, steps=8, stride=4, seed=1, name="good1"),
               WalkerSpec(atoms=broken, steps=8, stride=4, seed=2, name="bad", **settings),
               WalkerSpec(atoms=atoms, steps=8, stride=4, seed=3, name="good2")]
    results = run_walkers(walkers, committee, tmp_path, upper=10.0, progress=False, device="cpu")
    assert [r.status for r in results] == [DONE, results[1].status, DONE], [r.message for r in results]
    assert results[1].status in ("ERROR", EXPLODED)
    assert all(r.steps == 8 for r in (results[0], results[2]))


def test_evaluate_isolated_keeps_each_frames_failure_its_own(committee):
    from alflow.explore.evaluator import evaluate_isolated

    good, bad = cu(1), cu(1)
    bad[1].symbol = "Ag"
    nan = cu(1)
    nan.positions[0] = np.nan
    evaluator = ModelEvaluator(committee, device="cpu")
    out = evaluate_isolated(evaluator, [good, bad, nan, good])
    assert isinstance(out[1], Exception) and "Ag" in str(out[1])
    assert np.isnan(out[2]["energy"])
    assert np.isfinite(out[0]["energy"]) and out[0]["energy"] == pytest.approx(out[3]["energy"])
