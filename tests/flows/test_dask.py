"""The flow on a real local Dask cluster: two worker processes run the loop's stages (execution.task_runner: dask)."""

from __future__ import annotations

import pytest

pytest.importorskip("prefect_dask", reason="execution.task_runner: dask needs prefect-dask (pip install -e '.[test]')")
distributed = pytest.importorskip("distributed")

from alflow.config import ExecutionConfig  # noqa: E402
from alflow.loop import read_state  # noqa: E402
from flows.active_learning import run_flow, task_runner  # noqa: E402

ONE_ITERATION = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select"]


def test_dask_runner_from_config():
    from prefect_dask import DaskTaskRunner

    local = task_runner(ExecutionConfig(task_runner="dask", max_workers=2))
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["threads_per_worker"] == 1
    remote = task_runner(ExecutionConfig(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"


@pytest.mark.slow
def test_flow_runs_on_a_two_worker_local_dask_cluster(tmp_path, write_config, subprocess_env, monkeypatch):
    # worker processes import alflow/flows from this checkout and use one torch thread each (2 shared cores)
    for key, value in subprocess_env().items():
        if key in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        path = write_config(tmp_path, name="dask-flow", loop={"max_iterations": 1},
                            execution={"task_runner": "dask", "dask_address": cluster.scheduler_address})
        summary = run_flow(path)
        assert summary["status"] == "max_iterations" and summary["iterations"] == 1
        state = read_state(tmp_path / "run")
        assert list(state["stages"]) == ONE_ITERATION
        assert [s["engine"] for s in state["sessions"]] == ["prefect"]
        assert state["iterations"][0]["n_explored"] == 5
        # the stages ran on the cluster's worker processes, not in this one
        worker_tasks = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert len(worker_tasks) == 2 and sum(worker_tasks.values()) > 0
