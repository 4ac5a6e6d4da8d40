"""Kill real runs: ``python -m alflow.cli run CONFIG`` SIGKILLed (with its whole process group, as a
crashed node would lose it) during the initial labelling, during training and during labelling, then
rerun to completion. No finished stage is recomputed, no label is lost or duplicated, and the result
equals a clean uninterrupted run (same stages, same labelled frames: the loop is deterministic).

The killed sessions report to the session's Prefect test server (PREFECT_API_URL); the last one
runs as a user would, with no server set up (Prefect ephemeral mode, PREFECT_HOME in the run dir).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ase.io
import pytest

from alflow.config import load_config
from alflow.data import Dataset
from alflow.io import frame_hash
from alflow.loop import read_state, run_loop

pytestmark = pytest.mark.slow

EXPECTED = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select", "iter_000/label",
            "iter_001/train", "iter_001/explore", "iter_001/select"]
N_INITIAL, N_SELECT = 6, 3
WAIT_S = 400.0


def sections() -> dict:
    # sequential labels (max_workers 1) and a few epochs: kill windows of seconds, not milliseconds
    return {"name": "resume", "system": {"initial_rattle": {"n_frames": N_INITIAL}},
            "training": {"epochs": 6}, "selection": {"max_per_iteration": N_SELECT},
            "execution": {"device": "cpu", "max_workers": 1}}


def launch(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "alflow.cli", "run", str(config)], cwd=config.parent, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the run, its Prefect server if any, its threads: all at once
    proc.wait(timeout=30)


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], log: Path, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def stages(run_dir: Path) -> dict:
    return read_state(run_dir)["stages"]


def shards(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "dataset" / "shards").glob("*.extxyz"))


def stored_hashes(run_dir: Path) -> list[str]:
    """Hash of every frame in every shard, duplicates included (the Dataset itself would hide them)."""
    return [frame_hash(a) for path in shards(run_dir) for a in ase.io.read(path, index=":")]


def test_killed_runs_resume_without_recomputing_or_losing_labels(tmp_path, write_config, subprocess_env,
                                                                  prefect_api_url):
    # the reference: the same configuration, uninterrupted, in this process without Prefect
    clean_cfg = load_config(write_config(tmp_path / "clean", **sections()))
    clean = run_loop(clean_cfg)
    clean_state = read_state(clean_cfg.run_dir)
    assert list(clean_state["stages"]) == EXPECTED and clean["status"] == "max_iterations"

    config = write_config(tmp_path / "killed", **sections())
    run_dir, log = config.parent / "run", config.parent / "runs.log"
    to_server = subprocess_env(PREFECT_API_URL=prefect_api_url)

    # 1. killed during the initial labelling: some labels stored, the stage unfinished
    proc = launch(config, to_server, log)
    wait_until(proc, lambda: len(shards(run_dir)) >= 2, log, "two initial labels")
    kill(proc)
    assert "initial" not in stages(run_dir)
    labels_1 = set(stored_hashes(run_dir))
    assert 2 <= len(labels_1) < N_INITIAL

    # 2. killed while training iteration 0 (a member checkpoint exists, the stage is unfinished)
    proc = launch(config, to_server, log)
    wait_until(proc, lambda: (run_dir / "iter_000/train/member_0/best.pt").is_file(), log, "training")
    kill(proc)
    snapshot_2 = stages(run_dir)
    assert list(snapshot_2) == ["initial"]
    assert snapshot_2["initial"]["result"]["n_labelled"] == N_INITIAL
    assert labels_1 <= set(stored_hashes(run_dir))

    # 3. killed while labelling iteration 0: at least one new label stored, the stage unfinished
    proc = launch(config, to_server, log)
    wait_until(proc, lambda: "iter_000/select" in stages(run_dir) and len(shards(run_dir)) > N_INITIAL, log,
               "a label of iteration 0")
    kill(proc)
    snapshot_3 = stages(run_dir)
    assert list(snapshot_3) == EXPECTED[:4]
    labels_3 = set(stored_hashes(run_dir))
    assert N_INITIAL < len(labels_3) < N_INITIAL + N_SELECT
    committee_0 = run_dir / "iter_000/train/committee.pt"
    mtime_0 = committee_0.stat().st_mtime_ns

    # 4. the same command, as a user runs it: no server configured (ephemeral), to the end
    proc = launch(config, subprocess_env(), log)
    try:
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        kill(proc)
        raise
    assert (run_dir / ".prefect" / "prefect.db").is_file()  # ephemeral server, PREFECT_HOME in the run dir
    state = read_state(run_dir)
    assert list(state["stages"]) == EXPECTED and state["status"] == "max_iterations"
    assert [s["engine"] for s in state["sessions"]] == ["prefect"] * 4
    for snapshot in (snapshot_2, snapshot_3):  # finished stages kept their record: session, times, result
        for key, record in snapshot.items():
            assert state["stages"][key] == record, key
    assert state["stages"]["iter_000/label"]["session"] == 3
    assert committee_0.stat().st_mtime_ns == mtime_0

    hashes = stored_hashes(run_dir)
    assert len(hashes) == len(set(hashes)) == N_INITIAL + N_SELECT  # nothing stored twice
    assert labels_1 <= labels_3 <= set(hashes)  # nothing lost
    assert len(Dataset(run_dir / "dataset", create=False)) == len(hashes)

    # the same run as the clean one: stages, stop, iteration rows and the very same labelled frames
    assert set(hashes) == Dataset(Path(clean_cfg.run_dir) / "dataset", create=False).hashes
    keys = ("iteration", "dataset_size", "n_explored", "n_selected", "labels_added", "labels_total", "stop")
    assert [{k: r[k] for k in keys} for r in state["iterations"]] == \
        [{k: r[k] for k in keys} for r in clean_state["iterations"]]
    for key in EXPECTED[1:]:  # the models too: same validation errors to float precision
        if key.endswith("train"):
            got, ref = state["stages"][key]["result"]["valid"], clean_state["stages"][key]["result"]["valid"]
            assert got["forces_rmse"] == pytest.approx(ref["forces_rmse"], rel=1e-4), key
    assert (run_dir / "report.html").is_file()
