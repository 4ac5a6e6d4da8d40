"""Every wait has a limit and a message: a silent i-PI server, a Prefect API that never answers.

The servers here are real sockets that accept a connection and then say nothing
(or one message, then nothing): the old code waited on them forever.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from ase.build import bulk

from alflow.explore.ipi_driver import HEADER, IPIDriver, Target

ROOT = Path(__file__).resolve().parents[2]


class SilentServer:
    """A unix-socket server that accepts, optionally sends ``first`` (padded i-PI header), then never speaks."""

    def __init__(self, path: str, first: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.first = first
        self.path = path
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.first:
                conn.sendall(self.first.ljust(HEADER).encode())

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tiny_committee():
    import torch

    from potentials.committee import Committee

    torch.manual_seed(0)
    return Committee.build("schnet", 2, species=["Cu"], cutoff=3.0, seed=1, n_atom_basis=8, n_filters=8,
                           n_interactions=1, n_rbf=6)


@pytest.mark.parametrize("first", [None, "STATUS", "POSDATA"])
def test_ipi_driver_gives_up_on_a_silent_server_with_a_message(tiny_committee, first, capsys):
    """Silent from the start, after one STATUS, or in the middle of a message (POSDATA without its data)."""
    prefix = f"/tmp/alflow-test-{uuid.uuid4().hex[:6]}-"
    server = SilentServer(prefix + "ipi", first)
    try:
        driver = IPIDriver(tiny_committee, [Target(template=bulk("Cu", "fcc", a=3.6), unix="ipi", prefix=prefix)],
                           device="cpu")
        driver.read_timeout = 1.0
        driver.connect_all(timeout=5.0)
        outcome: list[int] = []
        thread = threading.Thread(target=lambda: outcome.append(driver.serve()), daemon=True)
        t0 = time.monotonic()
        thread.start()
        thread.join(15.0)
        assert not thread.is_alive(), "the driver still waits on a silent server"
        assert outcome == [1] and time.monotonic() - t0 < 5.0
        err = capsys.readouterr().err
        assert prefix + "ipi" in err and ("--read-timeout" in err or "timed out" in err), err
    finally:
        server.close()


def test_ipi_driver_cli_rejects_a_negative_read_timeout(capsys):
    from alflow.cli import main

    code = main(["ipi-driver", "--model", "m.pt", "--structure", "s.xyz", "--unix", "x", "--read-timeout", "-1"])
    assert code == 2 and "--read-timeout" in capsys.readouterr().err


def _write_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text("name: hang\nrun_dir: run\nsystem: {build: {element: Cu, crystal: fcc, a: 3.61, cubic: true}}\n"
                    "labelling: {oracle: emt}\nexecution: {device: cpu}\n")
    return path


@pytest.mark.slow  # imports torch and prefect in a subprocess: 15-30 s on a loaded machine
def test_alflow_run_stops_at_once_when_the_prefect_api_never_answers(tmp_path):
    """PREFECT_API_URL points at a socket that accepts and never replies: a clear message within seconds."""
    import os

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel accepts connections for us; nobody ever reads or answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    config = _write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "alflow.cli", "run", str(config), "--prefect-timeout", "3"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        listener.close()
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert url in done.stderr and "did not answer" in done.stderr and "PREFECT_API_URL" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 60.0
    assert not (tmp_path / "run" / "state.json").exists()  # nothing started before the check


def test_the_api_check_names_a_silent_server_and_a_refused_one_within_its_timeout():
    """``flows.server.check_api`` (imports no Prefect): silence and refusal both end with a message at once."""
    from flows.server import PrefectUnreachable, check_api

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    t0 = time.monotonic()
    try:
        with pytest.raises(PrefectUnreachable, match=r"did not answer GET /health within 1 s"):
            check_api(url, 1.0)
    finally:
        listener.close()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(PrefectUnreachable, match="no Prefect server answers at PREFECT_API_URL="):
        check_api(url, 1.0)  # the port is closed now
