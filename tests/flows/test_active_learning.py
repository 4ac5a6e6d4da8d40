"""The Prefect flow (flows.active_learning) on a real tiny run: 2 iterations, artifacts, replay, failures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from alflow.config import ExecutionConfig
from alflow.loop import read_state
from flows.active_learning import artifact_key, run_flow, task_runner

TWO_ITERATIONS = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select", "iter_000/label",
                  "iter_001/train", "iter_001/explore", "iter_001/select"]


def artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flow_runs_two_iterations_publishes_artifacts_and_replays(tmp_path, write_config):
    path = write_config(tmp_path)
    run_dir = tmp_path / "run"
    summary = run_flow(path)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 2 and summary["labels"] == 6
    assert summary["report"] == str(run_dir / "report.html") and (run_dir / "report.md").is_file()
    state = read_state(run_dir)
    assert list(state["stages"]) == TWO_ITERATIONS
    assert [s["engine"] for s in state["sessions"]] == ["prefect"]

    tables = artifacts(artifact_key("tiny-flow", "metrics"))
    assert len(tables) == 1 and tables[0].type == "table"
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["labels_added"] == 2 and rows[0]["frames_explored"] == 5
    assert rows[1]["stop"] == "max_iterations" and rows[1]["frames_trained_on"] == 6
    for r in rows:
        assert 0 <= r["accurate_fraction"] <= 1 and r["valid_forces_rmse_eV_per_A"] > 0 and r["training_seconds"] > 0
    reports = artifacts(artifact_key("tiny-flow", "report"))
    assert len(reports) == 1 and reports[0].type == "markdown"
    assert "# alflow report: tiny-flow" in reports[0].data and "max_iterations" in reports[0].data

    # a new flow run resumes from state.json, not from Prefect's cache: nothing is recomputed
    again = run_flow(path)
    assert again["status"] == "max_iterations" and again["sessions"] == 2
    replay = read_state(run_dir)
    assert replay["stages"] == state["stages"]
    assert len(artifacts(artifact_key("tiny-flow", "metrics"))) == 2  # one version per flow run


def test_a_failing_stage_fails_the_flow_and_is_not_recorded(tmp_path, write_config):
    # an oracle that fails every frame: the initial stage cannot give the 2 frames training needs (StageError after
    # retries). (One rattled frame no longer gets that far: alflow.preflight refuses it before the flow starts.)
    fixtures = str(Path(__file__).resolve().parents[1] / "alflow")
    failing = {"oracle": "oracle_fixtures:FlakyEMT", "retries": 0,
               "parameters": {"worker_pythonpath": fixtures, "mixing_beta": 0.7}}
    path = write_config(tmp_path, name="failing-oracle", system={"initial_rattle": {"n_frames": 2}}, labelling=failing)
    with pytest.raises(RuntimeError, match="at least 2"):
        run_flow(path)
    state = read_state(tmp_path / "run")
    assert state["stages"] == {} and state["status"] == "new"
    assert len(state["sessions"]) == 1


def test_task_runners_from_the_config():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    runner = task_runner(ExecutionConfig(task_runner="thread", max_workers=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    assert isinstance(task_runner(ExecutionConfig(task_runner="process")), ProcessPoolTaskRunner)
    if importlib.util.find_spec("prefect_dask") is None:
        with pytest.raises(RuntimeError, match="pip install prefect-dask"):
            task_runner(ExecutionConfig(task_runner="dask"))
    else:
        from prefect_dask import DaskTaskRunner

        assert isinstance(task_runner(ExecutionConfig(task_runner="dask", dask_address="tcp://x:8786")), DaskTaskRunner)
    assert artifact_key("Cu EMT_run 1", "metrics") == "cu-emt-run-1-metrics"
    assert artifact_key("___", "report") == "alflow-report"
