"""The shipped examples (examples/*/config.yaml): each validates, and each runs one shrunken iteration.

The runs keep each example's own choices (engine, ensembles, architecture, oracle)
and shrink only the budget: one iteration, few frames, few steps and epochs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from alflow.config import RunConfig, config_from_dict, load_config
from alflow.loop import read_state, run_loop

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/config.yaml"))
ONE_ITERATION = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select"]


def shrunk(name: str, run_dir: Path, *, n_frames: int = 4, steps: int = 10, epochs: int = 2,
           **overrides: Any) -> RunConfig:
    """The example ``name`` with one iteration and a tiny budget, writing into ``run_dir``."""
    path = EXAMPLES / name / "config.yaml"
    data = copy.deepcopy(yaml.safe_load(path.read_text()))
    data["run_dir"] = str(run_dir)
    data["system"]["initial_rattle"]["n_frames"] = n_frames
    data["committee"]["size"] = 2
    data["training"].update(epochs=epochs, patience=epochs, valid_fraction=0.25, max_time_s=60)
    for walker in data["exploration"]["walkers"]:
        walker.update(steps=steps, stride=min(walker.get("stride", 10), steps // 2))
    data["selection"]["max_per_iteration"] = 2
    data["loop"]["max_iterations"] = 1
    data["execution"]["device"] = "cpu"
    for section, values in overrides.items():
        data[section] = {**data[section], **values}
    return config_from_dict(data, base_dir=path.parent)


def test_there_are_examples():
    assert {p.parent.name for p in CONFIGS} >= {"cu_emt", "ipi_committee", "mace", "si_gpaw"}
    for path in CONFIGS:
        assert (path.parent / "README.md").is_file(), f"{path.parent.name} has no README.md"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_example_validates(path):
    config = load_config(path)
    assert config.name and config.loop.max_iterations >= 1
    assert config.run_dir == path.parent / "runs" / config.name  # relative to the example, not the working dir


def check_one_iteration(config: RunConfig) -> dict[str, Any]:
    summary = run_loop(config)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 1
    state = read_state(config.run_dir)
    assert list(state["stages"]) == ONE_ITERATION
    row = state["iterations"][0]
    assert row["n_explored"] > 0 and 0 <= row["accurate_fraction"] <= 1
    assert (Path(config.run_dir) / "iter_000" / "train" / "committee.pt").is_file()
    return state


@pytest.mark.slow
def test_ipi_committee_runs_one_iteration(tmp_path):
    config = shrunk("ipi_committee", tmp_path / "run", steps=10,
                    potential={"hparams": {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 10}})
    assert config.exploration.engine == "ipi"
    assert [w.ensemble for w in config.exploration.walkers] == ["nvt-svr", "pimd"]
    state = check_one_iteration(config)
    walkers = state["stages"]["iter_000/explore"]["result"]["walkers"]
    assert len(walkers) == 2 and all(w["frames"] > 0 for w in walkers), walkers


@pytest.mark.slow
def test_mace_runs_one_iteration(tmp_path):
    config = shrunk("mace", tmp_path / "run", steps=10)
    assert config.potential.architecture == "mace"
    check_one_iteration(config)


@pytest.mark.slow
@pytest.mark.dft("gpaw")
def test_si_gpaw_runs_one_iteration(tmp_path):
    # 2 rattled 8-atom Si cells at PW 250 eV, Γ-only: each GPAW call takes seconds
    config = shrunk("si_gpaw", tmp_path / "run", n_frames=4, steps=4,
                    labelling={"parameters": {"mode": {"name": "pw", "ecut": 250.0}, "xc": "PBE",
                                              "kpts": {"size": [1, 1, 1], "gamma": True}}})
    assert config.labelling.oracle == "gpaw"
    state = check_one_iteration(config)
    initial = state["stages"]["initial"]["result"]
    assert initial["n_labelled"] == 4 and initial["n_failed"] == 0
