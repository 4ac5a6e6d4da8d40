"""``alflow deploy``: the loop registered on a Prefect server and run from there.

The slow tests start a real ``prefect server start`` (its own PREFECT_HOME and SQLite
database in a temp dir), register the tiny run with ``python -m alflow.cli deploy`` and let
a real ``prefect worker start`` (or the ``--serve`` process) run it from another working
directory, then check the run directory like ``alflow run`` would have left it. The fast
tests cover the error paths and what a deployment records, against the session's test server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from alflow.cli import main
from alflow.loop import read_state

EXPECTED = ["initial", "iter_000/train", "iter_000/explore", "iter_000/select"]  # max_iterations 1
WAIT_S = 480.0
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_ID = re.compile(r"^flow run: ([0-9a-f-]{36})$", re.MULTILINE)


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alflow.cli", "deploy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- fast: errors and the deployment record


def test_without_a_server_exit_2_and_say_how_to_start_one(tmp_path, write_config, subprocess_env):
    config = write_config(tmp_path / "cfg")
    home = tmp_path / "home"  # an empty profile: no PREFECT_API_URL from ~/.prefect either
    home.mkdir()
    done = _cli(str(config), env=subprocess_env(PREFECT_HOME=str(home)), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "PREFECT_API_URL is not set" in done.stderr
    assert "prefect server start" in done.stderr and "prefect config set PREFECT_API_URL=" in done.stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    done = _cli(str(config), env=subprocess_env(PREFECT_HOME=str(home), PREFECT_API_URL=dead), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"no Prefect server answers at PREFECT_API_URL={dead}" in done.stderr


def test_a_bad_config_exits_2_naming_the_field(tmp_path, write_config, capsys):
    config = write_config(tmp_path / "cfg", committee={"size": 1})
    assert main(["deploy", str(config)]) == 2
    err = capsys.readouterr().err
    assert "committee.size" in err and "invalid configuration" in err
    assert main(["deploy", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_deployment_records_the_absolute_config_and_a_process_pool(tmp_path, write_config, capsys,
                                                                     monkeypatch):
    from prefect.client.orchestration import get_client

    config = write_config(tmp_path / "cfg", name="recorded")
    monkeypatch.chdir(tmp_path / "cfg")
    assert main(["deploy", "config.yaml", "--pool", "unit-pool", "--name", "unit", "--interval", "3600",
                 "--run"]) == 0
    out = capsys.readouterr().out
    assert "prefect worker start --pool unit-pool" in out
    assert "prefect deployment run 'active-learning-deployment/unit'" in out
    assert "(created, type process)" in out
    run_id = RUN_ID.search(out).group(1)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("active-learning-deployment/unit")
        pool = client.read_work_pool("unit-pool")
        flow_run = client.read_flow_run(run_id)
    assert deployment.parameters == {"config_path": str(config.resolve())}
    assert deployment.work_pool_name == "unit-pool" and pool.type == "process"
    assert deployment.entrypoint == "flows/deploy.py:deployed_active_learning"
    assert deployment.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "alflow"
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [3600.0]
    assert flow_run.deployment_id == deployment.id and flow_run.state.type.value == "SCHEDULED"

    # deploying again updates the same deployment and reuses the pool
    assert main(["deploy", str(config), "--pool", "unit-pool", "--name", "unit"]) == 0
    out = capsys.readouterr().out
    assert "(created" not in out
    with get_client(sync_client=True) as client:
        again = client.read_deployment_by_name("active-learning-deployment/unit")
    assert again.id == deployment.id and not again.schedules


# ---------------------------------------------------------------- slow: a real server, worker and serve


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, its group and any descendant in another session (flow run processes)."""
    if proc.poll() is not None:
        return
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, subprocess_env):
    """``prefect server start`` on a free port, with its own PREFECT_HOME: yields (api_url, env_for_clients)."""
    root = tmp_path_factory.mktemp("prefect-server")
    (root / "home").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    env = subprocess_env(PREFECT_HOME=str(root / "home"), **settings,
                         PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}")
    log = root / "server.log"
    server = _launch([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env, root, log)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        (root / "clients").mkdir()
        yield url, subprocess_env(PREFECT_API_URL=url, PREFECT_HOME=str(root / "clients"),
                                  PREFECT_WORKER_QUERY_SECONDS="2", **settings)
    finally:
        _stop(server)


def _wait_for_run(url: str, run_id: str, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        flow_run = httpx.get(f"{url}/flow_runs/{run_id}", timeout=30).json()
        if flow_run["state_type"] in FINAL:
            return flow_run
        assert proc.poll() is None, f"exited ({proc.returncode}) before the flow run ended:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"flow run still {flow_run['state_type']}:\n{log.read_text()[-4000:]}"
        time.sleep(2)


def _check_finished_run(url: str, config: Path, name: str) -> None:
    """The run directory next to the config holds the stopped loop; Prefect has the subflow and the report."""
    run_dir = config.parent / "run"
    state = read_state(run_dir)
    assert list(state["stages"]) == EXPECTED and state["status"] == "max_iterations"
    assert [s["engine"] for s in state["sessions"]] == ["prefect"]
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    runs = httpx.post(f"{url}/flow_runs/filter", timeout=30,
                      json={"flows": {"name": {"any_": ["active-learning"]}},
                            "flow_runs": {"name": {"any_": [name]}}}).json()
    assert [(r["name"], r["state_type"]) for r in runs] == [(name, "COMPLETED")]  # the loop ran as a subflow
    artifacts = httpx.post(f"{url}/artifacts/filter", timeout=30,
                           json={"artifacts": {"key": {"any_": [f"{name}-report", f"{name}-metrics"]}}}).json()
    assert sorted(a["key"] for a in artifacts) == [f"{name}-metrics", f"{name}-report"]


@pytest.mark.slow
def test_a_worker_runs_the_deployment_from_the_work_pool(tmp_path, write_config, real_server):
    url, env = real_server
    config = write_config(tmp_path / "cfg", name="pooled", loop={"max_iterations": 1})
    done = _cli(str(config), "--pool", "test-pool", "--run", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prefect worker start --pool test-pool" in done.stdout
    assert "prefect deployment run 'active-learning-deployment/pooled'" in done.stdout
    run_id = RUN_ID.search(done.stdout).group(1)

    log = tmp_path / "worker.log"  # the worker runs elsewhere: every path must come from the deployment
    worker = _launch([sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool", "--limit", "1"],
                     env, tmp_path / "worker", log)
    try:
        flow_run = _wait_for_run(url, run_id, worker, log)
    finally:
        _stop(worker)
    assert flow_run["state_type"] == "COMPLETED", log.read_text()[-4000:]
    _check_finished_run(url, config, "pooled")
    assert not any((tmp_path / "worker").iterdir())  # nothing written where the worker was started


@pytest.mark.slow
def test_serve_runs_the_deployment_in_its_own_process(tmp_path, write_config, real_server):
    url, env = real_server
    config = write_config(tmp_path / "cfg", name="served", loop={"max_iterations": 1})
    log = tmp_path / "serve.log"
    proc = _launch([sys.executable, "-m", "alflow.cli", "deploy", str(config), "--serve", "--run"], env,
                   tmp_path / "elsewhere", log)
    try:
        deadline = time.monotonic() + 120
        while not (found := RUN_ID.search(log.read_text())):
            assert proc.poll() is None, f"serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no flow run started:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        assert "prefect deployment run 'active-learning-deployment/served'" in log.read_text()
        flow_run = _wait_for_run(url, found.group(1), proc, log)
        assert flow_run["state_type"] == "COMPLETED", log.read_text()[-4000:]
        deployment = httpx.get(f"{url}/deployments/{flow_run['deployment_id']}", timeout=30).json()
        assert deployment["work_pool_name"] is None  # served: no work pool
        os.kill(proc.pid, signal.SIGTERM)  # as a batch system ends a job: serving stops cleanly
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        _stop(proc)
    _check_finished_run(url, config, "served")
