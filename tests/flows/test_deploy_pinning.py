"""``alflow deploy --pin-config``: a deployment runs only the config it was deployed with (docs/security.md).

Against the session's test Prefect server: the deployment stores the config's sha256, and the
deployed flow's check (``flows.deploy.check_pinned``, what the flow runs first) refuses another
config path chosen by a flow run and a config whose content changed since the deployment.
"""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from alflow.cli import main
from alflow.config import ConfigError, config_digest
from flows.active_learning import run_flow
from flows.deploy import check_pinned


def test_a_pinned_deployment_runs_only_its_config(tmp_path, write_config, capsys, monkeypatch):
    config = write_config(tmp_path / "cfg", name="pinned")
    other = write_config(tmp_path / "elsewhere", name="other")
    digest = config_digest(config)
    assert main(["deploy", str(config), "--pool", "pin-pool", "--name", "pinned", "--pin-config"]) == 0
    capsys.readouterr()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("active-learning-deployment/pinned")
    assert deployment.parameters == {"config_path": str(config.resolve()), "config_sha256": digest}

    assert check_pinned(config, None, deployment.id) == digest
    with pytest.raises(ConfigError, match="pinned to"):  # a flow run's parameters chose another file
        check_pinned(other, None, deployment.id)
    with pytest.raises(ConfigError, match="pinned to"):  # ... or another digest
        check_pinned(config, config_digest(other), deployment.id)

    config.write_text(config.read_text().replace("oracle: emt", "oracle: os:system"))
    with pytest.raises(ConfigError, match="differs from the pinned sha256"):
        run_flow(config, config_sha256=check_pinned(config, None, deployment.id))  # before any stage runs
    assert not (tmp_path / "cfg" / "run").exists()

    monkeypatch.setenv("ALFLOW_CONFIG_DIR", str(tmp_path / "cfg"))
    with pytest.raises(ConfigError, match="ALFLOW_CONFIG_DIR"):  # an unpinned run from another directory
        check_pinned(other)


def test_the_local_dask_cluster_listens_on_loopback_only():
    """The scheduler, workers and dashboard of ``task_runner: dask`` without an address bind 127.0.0.1."""
    import psutil
    from distributed import LocalCluster

    from alflow.config import ExecutionConfig
    from flows.active_learning import task_runner

    runner = task_runner(ExecutionConfig(task_runner="dask", max_workers=1))
    with LocalCluster(**runner.cluster_kwargs) as cluster:
        me = psutil.Process()
        listening = [c.laddr for p in (me, *me.children(recursive=True))
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
