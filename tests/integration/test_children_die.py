"""SIGKILL or SIGTERM of ``alflow run`` / ``alflow md --engine ipi`` leaves no server behind.

Real commands in subprocesses: ``alflow run`` in Prefect mode (its temporary Prefect
server, ~230 MB, used to keep answering on loopback after the run was killed) and
``alflow md`` with i-PI (i-PI and the driver used to burn two cores for up to ten
minutes). Each test waits until the children are recorded in the run's pidfile,
kills the command, and checks with the kernel that every child is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alflow.process import alive, kill_tree

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")]
ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _wait_for_children(proc: subprocess.Popen, pidfile: Path, count: int, log: Path, seconds: float = 240.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the command exited with {proc.returncode} before starting its children:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            records = json.loads(pidfile.read_text())
        except (OSError, ValueError):
            records = []
        if len(records) >= count:
            return [r["pid"] for r in records]
        time.sleep(0.2)
    pytest.fail(f"no {count} children recorded in {pidfile} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def _all_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _config(directory: Path, **sections) -> Path:
    data = {
        "name": "kill-me", "run_dir": "run", "seed": 0,
        "system": {"build": {"element": "Cu", "crystal": "fcc", "a": 3.61, "cubic": True}, "supercell": [2, 2, 2],
                   "initial_rattle": {"n_frames": 4}},
        "potential": {"cutoff": 4.0, "hparams": {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 10}},
        "committee": {"size": 2},
        "training": {"epochs": 2000, "batch_size": 4, "valid_fraction": 0.25},
        "labelling": {"oracle": "emt", "timeout_s": 120},
        "execution": {"device": "cpu", "max_workers": 1},
        **sections,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_alflow_run_stops_its_temporary_prefect_server(tmp_path, sig):
    config = _config(tmp_path)
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "alflow.cli", "run", str(config)], cwd=tmp_path,
                                env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[int] = []
    try:
        children = _wait_for_children(proc, tmp_path / "run" / "prefect-server.json", 1, log)
        assert all(alive(p) for p in children)
        os.kill(proc.pid, sig)
        code = proc.wait(60)
        assert code == (-9 if sig == signal.SIGKILL else 143), log.read_text()[-3000:]
        left = _all_gone(children, 10.0)
        assert not left, f"Prefect server {left} survived the {sig.name} of alflow run"
        if sig == signal.SIGTERM:
            assert not (tmp_path / "run" / "prefect-server.json").exists()  # stopped and forgotten on the way out
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        for pid in children:
            if alive(pid):
                kill_tree(pid)


@pytest.fixture(scope="module")
def committee_file(tmp_path_factory) -> Path:
    import torch

    import potentials
    from potentials.committee import Committee

    torch.manual_seed(0)
    model = Committee.build("schnet", 2, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=8, n_filters=8,
                            n_interactions=1, n_rbf=6)
    path = tmp_path_factory.mktemp("model") / "committee.pt"
    potentials.save(model, path)
    return path


def test_sigkill_of_alflow_md_stops_ipi_and_the_driver(tmp_path, committee_file):
    config = _config(tmp_path, exploration={
        "engine": "ipi", "walkers": [{"ensemble": "nvt-svr", "temperature": 300, "steps": 1_000_000, "stride": 100,
                                      "timestep": 1.0}]})
    out = tmp_path / "md"
    log = tmp_path / "md.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "alflow.cli", "md", str(config), "--model", str(committee_file),
                                 "--engine", "ipi", "--out", str(out), "--device", "cpu", "--no-progress"],
                                cwd=tmp_path, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[int] = []
    try:
        children = _wait_for_children(proc, out / "ipi-children.json", 2, log)  # the i-PI server and the driver
        time.sleep(1.0)  # the driver connected: both are computing
        assert all(alive(p) for p in children)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = _all_gone(children, 5.0)
        assert not left, f"{left} survived the SIGKILL of alflow md"
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        for pid in children:
            if alive(pid):
                kill_tree(pid)
