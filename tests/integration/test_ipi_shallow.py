"""A shallow committee behind the real i-PI server: its heads' spread is paid only where i-PI records it.

i-PI records the committee extras of the initial structure and of every ``stride``-th step; the driver
(``--spread-stride``, which ``run_ipi`` sets to the input's stride) computes the heads' per-head forces
only for those evaluations. If the driver's count and i-PI's steps ever disagreed, i-PI would stop with
"Extra type 'committee_force' is not among the quantities returned by the forcefield" and the walker
would end in ERROR: each run here must end DONE with the recorded forces equal to the model's.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.io import read

import potentials
from alflow import keys
from alflow.explore.evaluator import ModelEvaluator
from alflow.explore.ipi import IPIRunSpec, load_alpha, parse_run, read_extras, run_ipi, run_ipi_walkers
from alflow.explore.ipi_driver import reply
from potentials.shallow import ShallowCommittee

pytestmark = pytest.mark.slow  # each test starts i-PI servers


def _shallow(tmp_path_factory, mode: str):
    torch.manual_seed(0)
    model = ShallowCommittee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, forces_mode=mode,
                                   n_atom_basis=16, n_filters=16, n_interactions=2, n_rbf=10)
    model.double()
    model.set_alpha(1.7)
    path = tmp_path_factory.mktemp(f"shallow_{mode}") / "shallow.pt"
    potentials.save(model, path)
    return path


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    return _shallow(tmp_path_factory, "heads")


@pytest.fixture(scope="module")
def mean_file(tmp_path_factory):
    return _shallow(tmp_path_factory, "mean")


def cu(rattle: float = 0.05):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(rattle, seed=3)
    return atoms


def _served(log: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) evaluations in (\d+) committee calls, (\d+) of them with the committee spread", log)
    assert m, log
    return int(m[1]), int(m[2]), int(m[3])


def test_reply_leaves_out_the_members_forces_where_the_spread_was_skipped():
    r = {"energy": -1.0, "forces": np.ones((2, 3)), "stress": None, "energies": np.array([-1.1, -0.9]),
         "forces_comm": np.ones((2, 2, 3)), "force_deviation": np.array([np.nan, np.nan]),
         keys.MAX_FORCE_DEVIATION: float("nan")}
    cell = np.eye(3) * 5.0
    with_members = json.loads(reply(r, cell, False)[3])
    without = json.loads(reply(r, cell, False, members=False)[3])
    assert {"committee_pot", "committee_force", "committee_virial", "force_deviation"} <= set(with_members)
    assert "committee_force" not in without and "committee_virial" not in without
    assert len(without["committee_pot"]) == 2 and len(without["force_deviation"]) == 2


def test_heads_spread_only_on_recorded_steps_and_the_recorded_forces_are_the_heads(tmp_path, heads_file):
    spec = IPIRunSpec(atoms=cu(), ensemble="nvt-svr", steps=20, stride=5, name="sparse", alpha=load_alpha(heads_file))
    result = run_ipi(spec, heads_file, tmp_path, wall_seconds=240)
    assert result.status == "DONE", result.message
    evaluations, calls, with_spread = _served((tmp_path / "driver.log").read_text())
    assert (evaluations, calls, with_spread) == (21, 21, 5)  # steps 0..20; the spread at 0, 5, 10, 15, 20
    model = potentials.load(heads_file, device="cpu")
    evaluate = ModelEvaluator(model, device="cpu")
    forces = read_extras(tmp_path / "simulation.committee_force_0")
    positions = read(tmp_path / "simulation.pos_0.extxyz", ":")
    assert [step for step, _ in forces] == [0, 5, 10, 15, 20]
    frames = parse_run(tmp_path, spec)
    for pos, (_, force), frame in zip(positions, forces, frames):
        pos.pbc = True
        [ref] = evaluate([pos])
        heads = force.reshape(3, len(pos), 3) * units.Hartree / units.Bohr
        mean = ref["forces_comm"].mean(0)
        # i-PI rescales the members about their mean by the committee's alpha (1.7, given as alflow's runner
        # gives it); the model's own spread has it too
        np.testing.assert_allclose(mean + 1.7 * (ref["forces_comm"] - mean), heads, rtol=1e-6, atol=1e-8)
        assert np.ptp(heads, axis=0).max() > 1e-4  # real heads, not copies of the mean
        assert frame.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(ref[keys.MAX_FORCE_DEVIATION], rel=1e-6)


def test_every_step_and_sparse_spread_give_the_same_recorded_frames(tmp_path, heads_file):
    """Stride 1 (the standalone driver's default) against the recorded stride, with NPT and a 2-bead ring
    polymer too: the same trajectory and the same scores (the mean forces agree to round-off)."""
    runs = {}
    for name, ensemble, extra in (("svr", "nvt-svr", {}), ("npt", "npt-iso", {"pressure": 0.5}),
                                  ("pimd", "pimd", {"nbeads": 2, "timestep": 0.5})):
        spec = IPIRunSpec(atoms=cu(), ensemble=ensemble, steps=12, stride=4, name=name, alpha=load_alpha(heads_file),
                          **extra)
        sparse = run_ipi_walkers([spec], heads_file, tmp_path / f"{name}-sparse", wall_seconds=240)[0]
        assert sparse.status == "DONE", sparse.message
        runs[name] = (spec, tmp_path / f"{name}-sparse")
        log = (tmp_path / f"{name}-sparse" / "driver.log").read_text()
        beads = spec.nbeads
        evaluations, _, with_spread = _served(log)
        assert evaluations == 13 * beads
        assert with_spread <= 4 * beads  # steps 0, 4, 8, 12 (fewer calls when beads share one)
    # the same svr run with the spread every step
    spec, sparse_dir = runs["svr"]
    dense_dir = tmp_path / "svr-dense"
    dense = run_ipi_walkers([spec], heads_file, dense_dir, wall_seconds=240, spread_stride=1)[0]
    assert dense.status == "DONE", dense.message
    assert _served((dense_dir / "driver.log").read_text())[2] == 13
    a, b = parse_run(sparse_dir / "svr", spec), parse_run(dense_dir / "svr", spec)
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b):
        np.testing.assert_allclose(fa.positions, fb.positions, atol=1e-7)
        assert fa.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(fb.info[keys.MAX_FORCE_DEVIATION], rel=1e-5)


def test_a_mean_mode_shallow_committee_scores_its_i_pi_frames(tmp_path, mean_file):
    """``mean`` mode sends K copies of the mean forces: the frames' scores are the model's energy-spread scores
    (recorded by i-PI as committee_force_deviation), not the zero spread of identical forces."""
    spec = IPIRunSpec(atoms=cu(0.1), ensemble="nvt-svr", steps=6, stride=3, name="mean", alpha=load_alpha(mean_file))
    result = run_ipi(spec, mean_file, tmp_path, wall_seconds=240)
    assert result.status == "DONE", result.message
    evaluate = ModelEvaluator(potentials.load(mean_file, device="cpu"), device="cpu")
    frames = parse_run(tmp_path, spec)
    positions = read(tmp_path / "simulation.pos_0.extxyz", ":")
    assert len(frames) == len(positions) == 3
    for frame, pos in zip(frames, positions):
        pos.pbc = True
        [ref] = evaluate([pos])
        assert ref[keys.MAX_FORCE_DEVIATION] > 0
        assert frame.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(ref[keys.MAX_FORCE_DEVIATION], rel=1e-6)


def test_a_spread_stride_below_one_is_refused(tmp_path, heads_file):
    import subprocess
    import sys

    cu().write(tmp_path / "cu.extxyz")
    done = subprocess.run([sys.executable, "-m", "alflow.cli", "ipi-driver", "--model", str(heads_file), "--structure",
                           str(tmp_path / "cu.extxyz"), "--unix", "nowhere", "--spread-stride", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--spread-stride: expected MD steps >= 1, got 0" in done.stderr, done.stderr
