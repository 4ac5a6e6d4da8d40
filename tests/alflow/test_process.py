"""alflow.process: children die with their parent, even by SIGKILL; nothing escapes a kill.

Every test starts a real parent process (a small Python script), kills it with a
real signal and checks the kernel's view of its child through /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alflow.process import alive, descendants, kill_tree, process_start_time, reap, start, stop

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")
ROOT = str(Path(__file__).resolve().parents[2])
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _parent(script: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    """Run ``script`` as a parent process; it prints one JSON line (the pids it wants checked) when ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line, f"the parent exited with {proc.wait()} before it was ready"
    return proc, json.loads(line)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def _cleanup(*pids: int) -> None:
    for pid in pids:
        if alive(pid):
            kill_tree(pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_child_dies_when_its_parent_is_killed(tmp_path, sig):
    parent, info = _parent("""
        import json, sys, time
        from alflow.process import start
        child = start([sys.executable, "-c", "import time; time.sleep(600)"])
        print(json.dumps({"child": child.pid}), flush=True)
        time.sleep(600)
    """, tmp_path)
    child = info["child"]
    try:
        assert alive(child)
        os.kill(parent.pid, sig)
        parent.wait(10)
        assert _gone_within(child, 5.0), f"child {child} survived the {sig.name} of its parent"
    finally:
        _cleanup(child, parent.pid)


def test_without_the_death_signal_the_child_survives_and_the_reaper_kills_it(tmp_path):
    """The control: a plain child outlives a SIGKILLed parent; ``reap`` at the next start takes it down."""
    pidfile = tmp_path / "children.json"
    parent, info = _parent("""
        import json, sys, time
        from alflow.process import start
        child = start([sys.executable, "-c", "import time; time.sleep(600)"], death_signal=None, pidfile=sys.argv[1])
        print(json.dumps({"child": child.pid}), flush=True)
        time.sleep(600)
    """, tmp_path, str(pidfile))
    child = info["child"]
    try:
        record = json.loads(pidfile.read_text())
        assert [r["pid"] for r in record] == [child] and record[0]["parent"] == parent.pid
        assert reap(pidfile) == [] and alive(child)  # the parent still runs: its child is left alone
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        time.sleep(0.5)
        assert alive(child), "the control failed: the child died without the death signal"
        assert reap(pidfile) == [child]
        assert _gone_within(child, 5.0)
        assert not pidfile.exists()
    finally:
        _cleanup(child, parent.pid)


def test_reap_never_kills_a_reused_pid(tmp_path):
    bystander = subprocess.Popen(SLEEPER)
    try:
        pidfile = tmp_path / "children.json"
        pidfile.write_text(json.dumps([{"pid": bystander.pid, "start": process_start_time(bystander.pid) - 1,
                                        "parent": 2**22 + 7, "parent_start": 1}]))
        assert reap(pidfile) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # a session of its own: out of reach of killpg
    if os.fork() == 0:
        open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def _wait_for_file(path: Path, seconds: float = 20.0) -> int:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(path.read_text())


def test_kill_tree_reaches_a_daemon_in_its_own_session(tmp_path):
    """A grandchild that double-forks into a new session is re-parented to the subreaper child, and killed."""
    marker = tmp_path / "daemon.pid"
    root = start([sys.executable, "-c", DAEMON, str(marker)], subreaper=True)
    daemon = _wait_for_file(marker)
    try:
        assert os.getsid(daemon) != os.getsid(root.pid)
        assert daemon in descendants(root.pid)  # adopted by the subreaper, not by init
        stop(root, grace=1.0)
        assert _gone_within(daemon, 5.0), "the daemon escaped"
        assert root.returncode is not None
    finally:
        _cleanup(daemon, root.pid)


def test_without_subreaper_the_daemon_escapes_the_tree(tmp_path):
    """The control for the test above: without the subreaper the daemon leaves the tree (killpg misses it too)."""
    marker = tmp_path / "daemon.pid"
    root = start([sys.executable, "-c", DAEMON, str(marker)], subreaper=False)
    daemon = _wait_for_file(marker)
    try:
        time.sleep(0.2)
        assert daemon not in descendants(root.pid)
        os.killpg(root.pid, signal.SIGKILL)
        root.wait(5)
        assert not _gone_within(daemon, 0.5)
    finally:
        _cleanup(daemon, root.pid)


def test_memory_limit_makes_a_large_allocation_fail(tmp_path):
    code = "b = bytearray(2_000_000_000)"
    limited = start([sys.executable, "-c", code], memory_limit_bytes=1_000_000_000, stderr=subprocess.PIPE)
    _, err = limited.communicate(timeout=60)
    assert limited.returncode == 1 and b"MemoryError" in err
    free = start([sys.executable, "-c", "b = bytearray(20_000_000)"], memory_limit_bytes=1_000_000_000)
    assert free.wait(60) == 0


def test_sigterm_runs_cleanup_and_stops_children(tmp_path):
    """``sigterm_exits``: SIGTERM runs ``finally`` (the child is stopped, the pidfile emptied), exit code 143."""
    pidfile = tmp_path / "children.json"
    parent, info = _parent("""
        import json, sys, time
        from alflow.process import sigterm_exits, start, stop
        with sigterm_exits():
            child = start([sys.executable, "-c", "import time; time.sleep(600)"], death_signal=None,
                          pidfile=sys.argv[1])
            try:
                print(json.dumps({"child": child.pid}), flush=True)
                time.sleep(600)
            finally:
                stop(child, pidfile=sys.argv[1])
    """, tmp_path, str(pidfile))
    child = info["child"]
    try:
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(15) == 143
        assert _gone_within(child, 2.0)
        assert not pidfile.exists()
    finally:
        _cleanup(child, parent.pid)


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path):
    stubborn = start([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    stubborn.stdout.readline()
    t0 = time.monotonic()
    assert stop(stubborn, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5.0


def test_sigterm_wrapped_by_a_library_still_exits_143(monkeypatch, capsys):
    """SIGTERM's SystemExit caught and re-raised as another error (as pydantic does inside Prefect's
    serialisers) must still end `alflow run` with 143, not as a failed stage (exit 1)."""
    import argparse
    import time

    from alflow.commands import run as run_command

    def wrapped(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except SystemExit as exc:
            raise RuntimeError("Error calling function `_ser_model`: SystemExit: 143") from exc
        return 0

    monkeypatch.setattr(run_command, "_run", wrapped)
    assert run_command.run(argparse.Namespace()) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_a_guarded_child_dies_when_the_parent_is_killed_while_its_watchdog_starts(tmp_path, delay):
    """CI once saw the Prefect server survive: the parent was SIGKILLed right after ``guard()`` returned, and the
    kernel's SIGTERM killed the watchdog before its handler was installed. Now the watchdog arms the signal itself."""
    parent, info = _parent("""
        import json, os, signal, subprocess, sys, time
        from alflow.process import guard
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        watchdog = guard(child.pid)
        print(json.dumps({"child": child.pid, "watchdog": watchdog.pid}), flush=True)
        time.sleep(float(sys.argv[1]))
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path, str(delay))
    child = info["child"]
    try:
        parent.wait(10)
        assert _gone_within(child, 5.0), f"guarded child {child} survived the SIGKILL {delay} s after guard()"
        assert _gone_within(info["watchdog"], 5.0)
    finally:
        _cleanup(child, info["watchdog"], parent.pid)
