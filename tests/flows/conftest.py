"""Flow tests share ONE temporary Prefect server (SQLite in a temp dir) for the whole session.

Starting the server costs ~7-12 s per process (more on a loaded machine), so it is
started once here; ``prefect_api_url`` gives its address to subprocesses
(``alflow run`` in test_resume.py) that should report to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

TINY_SCHNET = {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 10}


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _write_config(directory: Path, **sections) -> Path:
    """A tiny 2-iteration run (2 x tiny SchNet, EMT-labelled 32-atom Cu, 1 walker) as a YAML file."""
    data = {
        "name": "tiny-flow", "run_dir": "run", "seed": 0,
        "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}, "supercell": [2, 2, 2],
                   "initial_rattle": {"n_frames": 4}},
        "potential": {"cutoff": 4.0, "hparams": TINY_SCHNET},
        "committee": {"size": 2},
        "training": {"epochs": 3, "batch_size": 4, "valid_fraction": 0.25},
        "exploration": {"walkers": [{"temperature": 300, "steps": 20, "stride": 5}]},
        "selection": {"lower": 0.001, "upper": 1000.0, "max_per_iteration": 2},
        "labelling": {"oracle": "emt", "timeout_s": 120},
        "loop": {"max_iterations": 2},
        "execution": {"device": "cpu", "max_workers": 2},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    return path


def _subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of an ``alflow run`` subprocess: one torch thread (2 shared cores), this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    root = str(Path(__file__).resolve().parents[2])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture(scope="session")
def write_config():
    """``write_config(directory, **sections) -> config path``: the tiny run, sections updated."""
    return _write_config


@pytest.fixture(scope="session")
def subprocess_env():
    """``subprocess_env(**extra) -> env`` for ``python -m alflow.cli`` subprocesses."""
    return _subprocess_env
