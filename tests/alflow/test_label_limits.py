"""Label workers: a timeout kills every process the oracle started; the optional memory limit holds.

Real workers (``python -m alflow.label_worker``) run the oracles of
``escape_oracles.py``; the checks look at the kernel's process table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from ase.build import bulk

from alflow.config import LabellingConfig
from alflow.label import run_calculation
from alflow.process import alive, kill_tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreaper and /proc: Linux")
HERE = str(Path(__file__).resolve().parent)


def test_a_daemon_started_by_the_oracle_does_not_escape_the_timeout(tmp_path):
    marker = tmp_path / "daemon.pid"
    atoms = bulk("Cu", "fcc", a=3.6)
    out = run_calculation(atoms, "escape_oracles:DaemonThenHang", {"worker_pythonpath": HERE, "marker": str(marker)},
                          tmp_path / "task", timeout_s=3.0)
    assert out.status == "timeout"
    assert marker.exists(), f"the oracle never started its daemon:\n{out.log_tail}"
    daemon = int(marker.read_text())
    deadline = time.monotonic() + 5.0
    while alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(daemon), "the oracle's daemon (own session) survived the label timeout"
    finally:
        if alive(daemon):
            kill_tree(daemon)


def test_memory_limit_fails_the_attempt_with_a_memory_error(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6)
    params = {"worker_pythonpath": HERE, "gigabytes": 3.0}
    out = run_calculation(atoms, "escape_oracles:MemoryHog", params, tmp_path / "limited", timeout_s=60.0,
                          memory_limit_gb=1.5)
    assert out.status == "error" and "MemoryError" in out.error, (out.status, out.error, out.log_tail)
    small = run_calculation(atoms, "escape_oracles:MemoryHog", {**params, "gigabytes": 0.05}, tmp_path / "small",
                            timeout_s=60.0, memory_limit_gb=1.5)
    assert small.status == "labelled", (small.status, small.error, small.log_tail)


@pytest.mark.parametrize("value", [0.1, float("nan"), float("inf"), 1e9])
def test_memory_limit_is_validated(value):
    with pytest.raises(ValueError, match="memory_limit_gb"):
        LabellingConfig(memory_limit_gb=value)
    assert LabellingConfig(memory_limit_gb=4).memory_limit_gb == 4
