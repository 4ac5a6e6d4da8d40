"""Engine parity: one configuration through every exploration engine gives frames of one format.

The same fields on every scored frame, the committee's calibrated scores (its α) in each,
and the same stop rules (a walker whose atoms start 0.09 Å apart is EXPLODED, whatever the engine).
"""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read, write

import potentials
from alflow import keys
from alflow.config import ConfigError, ExplorationConfig, config_from_dict
from alflow.explore.evaluator import ModelEvaluator
from alflow.explore.frames import ALPHA as ALPHA_KEY
from alflow.explore.runner import explore
from potentials.committee import Committee

ALPHA = 2.5  # the committee's calibration: every engine's scores must carry it
# every engine the configuration accepts (ase, ipi, and batched where it exists), compared with ase
ENGINES = [e for e in typing.get_args(ExplorationConfig.model_fields["engine"].annotation) if e != "ase"]


@pytest.fixture(scope="module")
def committee_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                            n_interactions=2, n_rbf=10)
    model.double()
    for member in model.members:
        member.scale.fill_(0.05)
    model.set_alpha(ALPHA)
    path = tmp_path_factory.mktemp("model") / "committee.pt"
    potentials.save(model, path)
    return path


def config(engine: str, structure: str | None = None, **walker):
    system = {"structures": [structure]} if structure else {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61,
                                                                      "cubic": True}, "supercell": [2, 2, 2]}
    walker = {"ensemble": "nvt-langevin", "temperature": 300.0, "timestep": 1.0, "steps": 10, "stride": 5,
              "start": "rattled", "rattle_stdev": 0.03, **walker}
    return config_from_dict({
        "name": "parity", "seed": 0, "system": {**system, "initial_rattle": None},
        "potential": {"architecture": "schnet", "cutoff": 4.0},
        "labelling": {"oracle": "emt"},
        "selection": {"lower": 0.05, "upper": 50.0},
        "exploration": {"engine": engine, "walkers": [walker], "min_distance": 0.5, "uncertain_patience": 5},
    })


def frames_of(results):
    [result] = results
    return result, read(result["trajectory"], ":")


@pytest.mark.slow
def test_engines_write_the_same_fields_and_the_calibrated_scores(tmp_path, committee_file):
    evaluate = ModelEvaluator(potentials.load(committee_file, device="cpu"), device="cpu")
    fields = {}
    for engine in ["ase", *ENGINES]:
        result, frames = frames_of(explore(config(engine), committee_file, tmp_path / engine, device="cpu",
                                           progress=False))
        assert result["status"] == "DONE", (engine, result["message"])
        assert len(frames) == 3 and [int(f.info[keys.STEP]) for f in frames] == [0, 5, 10], engine
        assert json.loads((tmp_path / engine / "walkers.json").read_text())[0]["name"] == result["name"]
        fields[engine] = (set(frames[0].info) - {keys.SOURCE}, set(frames[0].arrays))
        assert all(f.info[ALPHA_KEY] == ALPHA for f in frames), engine  # the α the scores were computed with
        for frame in frames[1:]:
            [ref] = evaluate([frame])  # α = 2.5 is applied by the committee: the frame must carry the same
            assert frame.info[keys.MAX_FORCE_DEVIATION] == pytest.approx(ref[keys.MAX_FORCE_DEVIATION], rel=1e-6), engine
            assert frame.info[keys.ENERGY_DEVIATION_PER_ATOM] == pytest.approx(
                ref[keys.ENERGY_DEVIATION_PER_ATOM], rel=1e-6, abs=1e-12), engine
            # extxyz stores per-atom arrays with 8 decimals
            np.testing.assert_allclose(frame.arrays[keys.FORCE_DEVIATION], ref["force_deviation"], rtol=1e-6, atol=2e-8)
            np.testing.assert_allclose(frame.arrays[keys.PRED_FORCES], ref["forces"], rtol=1e-6, atol=2e-8)
        assert result["max_force_deviation"] == pytest.approx(max(f.info[keys.MAX_FORCE_DEVIATION] for f in frames))
    for engine in ENGINES:
        assert fields[engine] == fields["ase"], engine


@pytest.mark.slow
def test_engines_stop_a_walker_whose_atoms_overlap(tmp_path, committee_file):
    """Atoms 0.09 Å apart: EXPLODED at step 0 in every engine, with that frame written (was DONE in i-PI)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.positions[1] = atoms.positions[0] + [0.09, 0.0, 0.0]
    write(tmp_path / "overlap.extxyz", atoms)
    for engine in ["ase", *ENGINES]:
        cfg = config(engine, structure=str(tmp_path / "overlap.extxyz"), start="relaxed")
        result, frames = frames_of(explore(cfg, committee_file, tmp_path / engine, device="cpu", progress=False))
        assert result["status"] == "EXPLODED", (engine, result)
        assert "0.090 Å apart" in result["message"], engine
        assert result["steps"] == 0 and int(frames[-1].info[keys.STEP]) == 0, engine


@pytest.mark.slow
def test_engines_stop_an_uncertain_walker_after_patience(tmp_path, committee_file):
    """selection.upper below every deviation: UNCERTAIN after uncertain_patience (5) steps, i.e. at step 4."""
    for engine in ["ase", *ENGINES]:
        cfg = config(engine)
        cfg.selection.lower, cfg.selection.upper = 1e-9, 1e-8
        result, frames = frames_of(explore(cfg, committee_file, tmp_path / engine, device="cpu", progress=False))
        assert result["status"] == "UNCERTAIN", (engine, result)
        assert result["steps"] == 4 and int(frames[-1].info[keys.STEP]) == 4, (engine, result)
        assert "for 5 steps" in result["message"], engine


def test_ipi_rejects_ramps_it_cannot_run_naming_the_field():
    config("ipi", temperature=[300.0, 600.0])  # two set points: i-PI's linear t_ramp
    with pytest.raises(ConfigError, match=r"exploration\.walkers\.0\.temperature: engine 'ipi' ramps linearly"):
        config("ipi", temperature=[300.0, 600.0, 300.0])
    with pytest.raises(ConfigError, match=r"exploration\.walkers\.0\.pressure: engine 'ipi'"):
        config("ipi", ensemble="npt-iso", pressure=[0.0, 1.0, 2.0])
    config("ase", temperature=[300.0, 600.0, 300.0])  # the ASE engine interpolates any ramp
