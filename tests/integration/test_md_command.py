"""``alflow md CONFIG``: both engines from one config file, frames in one format."""

from __future__ import annotations

import pytest
import torch
import yaml
from ase.io import read

import potentials
from alflow import keys
from alflow.cli import main
from potentials.committee import Committee

CONFIG = {
    "name": "md-test",
    "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}, "supercell": [2, 2, 2]},
    "potential": {"architecture": "schnet", "cutoff": 4.0},
    "exploration": {
        "walkers": [
            {"ensemble": "nvt-svr", "temperature": 600, "steps": 20, "stride": 5, "timestep": 1.0},
            {"ensemble": "npt-iso", "temperature": 400, "pressure": 0.0, "steps": 20, "stride": 5, "timestep": 1.0,
             "start": "rattled"},
        ]
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("md")
    torch.manual_seed(0)
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                            n_interactions=2, n_rbf=10)
    for member in model.members:
        member.scale.fill_(0.05)
    potentials.save(model, root / "committee.pt")
    (root / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


@pytest.mark.parametrize("engine", ["ase", pytest.param("ipi", marks=pytest.mark.slow)])
def test_md_command_runs_both_engines(setup, engine, capsys):
    out = setup / f"out-{engine}"
    code = main(["md", str(setup / "run.yaml"), "--model", str(setup / "committee.pt"), "--engine", engine,
                 "--out", str(out), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    trajectories = sorted(out.rglob("w*.extxyz"))
    assert len(trajectories) == 2, printed
    for path in trajectories:
        frames = read(path, ":")
        assert len(frames) == 5  # steps 0, 5, ..., 20
        for frame in frames:
            assert {keys.MAX_FORCE_DEVIATION, keys.ENERGY_DEVIATION_PER_ATOM, keys.STEP, keys.WALKER} <= set(frame.info)
            assert frame.arrays["force_deviation"].shape == (len(frame),)
