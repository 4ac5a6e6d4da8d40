"""The flow on a real local Dask cluster: two worker processes run the loop's stages (execution.task_runner: dask)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def test_dask_resources_are_validated(tmp_path):
    with pytest.raises(ValueError, match="dask_resources"):
        ExecutionConfig(task_runner="thread", dask_resources={"train": {"GPU": 1}})
    with pytest.raises(ValueError, match="stage name"):
        ExecutionConfig(task_runner="dask", dask_resources={"training": {"GPU": 1}})
    with pytest.raises(ValueError, match="positive"):
        ExecutionConfig(task_runner="dask", dask_resources={"train": {"GPU": 0}})


def _plain_worker(address: str, env: dict[str, str]) -> subprocess.Popen:
    """A second, resource-less Dask worker process (as `dask worker ADDRESS` on a CPU node)."""
    code = ("import asyncio, sys\nfrom distributed import Worker\n"
            "async def main():\n"
            "    async with Worker(sys.argv[1], nthreads=1, dashboard=False) as w:\n"
            "        await w.finished()\n"
            "asyncio.run(main())\n")
    return subprocess.Popen([sys.executable, "-c", code, address], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_flow_runs_on_a_two_worker_dask_cluster_with_gpu_stages_on_the_gpu_worker(
        tmp_path, write_config, subprocess_env, monkeypatch):
    # worker processes import alflow/flows from this checkout and use one torch thread each (2 shared cores)
    env = subprocess_env()
    for key, value in env.items():
        if key in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    # worker 1 advertises a "GPU" resource (a label: this machine has no GPU; the scheduler only counts it),
    # worker 2 is a plain CPU worker in its own process
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None, resources={"GPU": 1}) as cluster, \
            distributed.Client(cluster) as client:
        plain = _plain_worker(cluster.scheduler_address, env)
        try:
            client.wait_for_workers(2, timeout=120)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            gpu_worker = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
            pids = client.run(os.getpid)
            path = write_config(tmp_path, name="dask-flow", loop={"max_iterations": 1},
                                execution={"task_runner": "dask", "dask_address": cluster.scheduler_address,
                                           "dask_resources": {"train": {"GPU": 1}, "explore": {"GPU": 1}}})
            summary = run_flow(path)
            assert summary["status"] == "max_iterations" and summary["iterations"] == 1
            state = read_state(tmp_path / "run")
            assert list(state["stages"]) == ONE_ITERATION
            assert [s["engine"] for s in state["sessions"]] == ["prefect"]
            assert state["iterations"][0]["n_explored"] == 5
            # every stage ran on a worker process, not in this one; train and explore on the GPU worker
            ran_on = {key: int(rec["result"]["worker"].rsplit(":", 1)[1]) for key, rec in state["stages"].items()}
            assert os.getpid() not in ran_on.values() and set(ran_on.values()) <= set(pids.values())
            assert ran_on["iter_000/train"] == ran_on["iter_000/explore"] == pids[gpu_worker]
        finally:
            os.killpg(plain.pid, signal.SIGKILL)
            plain.wait()
