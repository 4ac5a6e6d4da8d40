"""Process supervision: children that die with their parent, and nothing that escapes a kill.

Every long-lived child alflow starts (the temporary Prefect server of ``alflow
run``, i-PI and its driver, label workers) goes through :func:`start`:

- its own session and process group (``start_new_session``), so a terminal's
  Ctrl-C reaches alflow only and :func:`stop` can take the whole group down;
- on Linux, a parent-death signal (``prctl(PR_SET_PDEATHSIG)``, set in the child
  between fork and exec): when the alflow process dies, even by SIGKILL, the
  kernel sends the child ``death_signal`` (SIGKILL by default). The signal is
  tied to the *thread* that started the child, so start children from a thread
  that outlives them (the main thread, or the thread that also waits for them);
- optionally a record in a pidfile (JSON list; pid, its start time, the parent's
  pid and start time): :func:`reap` at the next start kills what a dead parent
  left behind where the parent-death signal is not available or came too late;
- a child started by someone else's code (Prefect's temporary server) gets a
  :func:`guard`: a tiny watchdog process, itself dying with this process, that
  kills the child when this process dies;
- optionally ``RLIMIT_AS`` (``memory_limit_bytes``) and
  ``PR_SET_CHILD_SUBREAPER`` (``subreaper=True``): every orphaned descendant of
  the child, even one that started its own session, is re-parented to the child
  instead of init, so :func:`kill_tree` finds it through ``/proc``.

Only the standard library is imported (the label worker imports this at start-up).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "start", "stop", "kill_tree", "descendants", "reap", "forget", "set_subreaper", "set_death_signal",
    "process_start_time", "alive", "sigterm_exits", "guard", "record",
]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")
_PIDFILE_LOCK = threading.Lock()


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded in the parent (a forked child should not dlopen); None off Linux."""
    if not _LINUX:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _prctl()


def set_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies; False where unsupported."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def set_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux >= 3.4); False where unsupported."""
    return _PRCTL is not None and _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22); None when gone or unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when given, still has ``start_time`` (not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == start_time


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` found through ``/proc`` (parents before children); [] without /proc."""
    if not os.path.isdir("/proc"):
        return []
    children = _children_map()
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_tree(pid: int, *, include_root: bool = True, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid``'s process group, every descendant (any session) and ``pid``; returns the pids hit.

    Descendants are first stopped (SIGSTOP), walking ``/proc`` until no new one
    appears, so a process that forks while it is being killed cannot slip out;
    then each gets ``sig``, the root last. Descendants that already escaped to
    init are out of reach: start the root with ``subreaper=True`` to keep them.
    """
    hit: list[int] = []
    seen: set[int] = set()
    if include_root:
        _signal(pid, signal.SIGSTOP)  # no new children while the tree is walked
    for _ in range(50):  # a fork bomb cannot keep this going forever
        new = [p for p in descendants(pid) if p not in seen]
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
        seen.update(new)
    for p in seen:
        _signal(p, sig)
        if sig != signal.SIGKILL:
            _signal(p, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        hit.append(p)
    if include_root:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
        _signal(pid, sig)
        if sig != signal.SIGKILL:
            _signal(pid, signal.SIGCONT)
        hit.append(pid)
    return hit


def _preexec(death_signal: int | None, parent: int, memory_limit_bytes: int | None, subreaper: bool,
             extra: Callable[[], None] | None) -> Callable[[], None]:
    def run() -> None:  # runs in the child between fork and exec: no imports, no locks
        if death_signal is not None and _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os.kill(os.getpid(), int(death_signal))
        if subreaper and _PRCTL is not None:
            _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if memory_limit_bytes is not None:
            import resource  # already imported by start(): a dict lookup here

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
        if extra is not None:
            extra()

    return run


def start(args: Sequence[str], *, pidfile: str | os.PathLike | None = None, death_signal: int | None = signal.SIGKILL,
          memory_limit_bytes: int | None = None, subreaper: bool = False,
          preexec_fn: Callable[[], None] | None = None, **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **popen)`` in its own session, dying with this process (module docstring).

    ``death_signal``: signal the child gets when the starting thread dies (None:
    none). ``pidfile``: record the child for :func:`reap`. ``memory_limit_bytes``:
    RLIMIT_AS of the child (bytes of address space). ``subreaper``: the child
    adopts its orphaned descendants.
    """
    if memory_limit_bytes is not None:
        import resource  # noqa: F401 - imported before fork for the child's preexec

        if memory_limit_bytes <= 0:
            raise ValueError(f"memory_limit_bytes: expected a positive number of bytes, got {memory_limit_bytes}")
    popen.setdefault("start_new_session", True)
    hook = _preexec(death_signal, os.getpid(), memory_limit_bytes, subreaper, preexec_fn)
    proc = subprocess.Popen(list(args), preexec_fn=hook, **popen)  # noqa: PLW1509 - see _preexec
    if pidfile is not None:
        _record(Path(pidfile), proc.pid, args)
    return proc


def stop(proc: subprocess.Popen | None, grace: float = 5.0, *, pidfile: str | os.PathLike | None = None) -> int | None:
    """SIGTERM ``proc`` and its group, SIGKILL the whole tree after ``grace`` s; returns its exit status (None if
    it was never started). Never waits longer than ``grace`` + 5 s."""
    if proc is None:
        return None
    try:
        if proc.poll() is None:
            # remember the descendants now: once the root exits, its orphans leave its tree
            tree = {p: process_start_time(p) for p in descendants(proc.pid)}
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGTERM)
            for p in (*tree, proc.pid):
                _signal(p, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            for p, started in tree.items():
                if started is not None and alive(p, started):
                    kill_tree(p)
        if proc.poll() is None:  # it ignored SIGTERM (only while not yet reaped is its pid surely ours)
            kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        return proc.returncode
    finally:
        if pidfile is not None:
            forget(pidfile, proc.pid)


# ----------------------------------------------------------------------------- pidfiles


def _read(pidfile: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("pid"), int)] if isinstance(records, list) else []


def _write(pidfile: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        pidfile.unlink(missing_ok=True)
        return
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    from alflow.fileio import atomic_write_json

    atomic_write_json(pidfile, records, indent=1)


def record(pidfile: str | os.PathLike, pid: int, command: Sequence[str] | str = ()) -> None:
    """Record child ``pid`` of this process in ``pidfile`` for :func:`reap` (a child started by other code)."""
    _record(Path(pidfile), pid, [command] if isinstance(command, str) else command)


def _record(pidfile: Path, pid: int, args: Sequence[str]) -> None:
    me = os.getpid()
    record = {"pid": pid, "start": process_start_time(pid), "parent": me, "parent_start": process_start_time(me),
              "command": " ".join(map(str, args))[:300]}
    with _PIDFILE_LOCK:
        _write(pidfile, [r for r in _read(pidfile) if r["pid"] != pid] + [record])


def forget(pidfile: str | os.PathLike, pid: int) -> None:
    """Drop ``pid`` from ``pidfile`` (the child was stopped); removes the file when it is empty."""
    pidfile = Path(pidfile)
    with _PIDFILE_LOCK:
        _write(pidfile, [r for r in _read(pidfile) if r["pid"] != pid])


def reap(pidfile: str | os.PathLike) -> list[int]:
    """Kill the children recorded in ``pidfile`` whose parent is gone; returns their pids.

    A record whose parent still runs (same pid and start time) belongs to a live
    alflow process and is kept. A recorded child is killed only while its pid
    still has the recorded start time, so a reused pid is never hit.
    """
    pidfile = Path(pidfile)
    killed, keep = [], []
    with _PIDFILE_LOCK:
        for r in _read(pidfile):
            if alive(r.get("parent", -1), r.get("parent_start")):
                keep.append(r)
            elif alive(r["pid"], r.get("start")):
                kill_tree(r["pid"])
                killed.append(r["pid"])
        _write(pidfile, keep)
    deadline = time.monotonic() + 5.0
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed



# set by sigterm_exits' handler: a library that catches the SystemExit it raises (and wraps it in
# its own error) cannot hide that the process was told to stop
TERMINATED = threading.Event()

@contextlib.contextmanager
def sigterm_exits(code: int = 143, grace: float = 15.0) -> Iterator[None]:
    """While active (main thread only), SIGTERM raises ``SystemExit(code)``: ``finally`` blocks and context
    managers run, so children are stopped and locks released, instead of Python's silent default death. If the
    process has not exited ``grace`` seconds (s) after the signal, it exits with ``code`` at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        TERMINATED.set()
        # a library may catch the SystemExit below and carry on (seen inside Prefect): leave anyway after a
        # grace period; children still die with us (parent-death signal, guard watchdogs)
        timer = threading.Timer(grace, os._exit, args=(code,))
        timer.daemon = True
        timers.append(timer)
        timer.start()
        raise SystemExit(code)

    timers: list[threading.Timer] = []

    TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in timers:  # the unwinding reached us: no need to force the exit
            timer.cancel()


# ----------------------------------------------------------------------------- guard


def python_module(module: str, *args: str) -> list[str]:
    """``[python, -P, -m, module, *args]``: an alflow Python subprocess that never imports from its working
    directory (``-P``, Python >= 3.11; ``-m`` would put it first on ``sys.path``, before the standard library,
    so a ``json.py`` or ``threading.py`` lying there would run). See docs/security.md."""
    return [sys.executable, *(("-P",) if sys.version_info >= (3, 11) else ()), "-m", module, *map(str, args)]


def guard(pid: int, *, interval: float = 0.5) -> subprocess.Popen:
    """Start a watchdog that kills ``pid`` (and its tree) as soon as this process dies, by any signal.

    For a child that other code started without a parent-death signal. The
    watchdog gets SIGTERM from the kernel when this process (the starting
    thread) dies, and also polls: parent gone, or ``pid`` replaced (start time),
    ends it. Stop the watchdog with :func:`stop` once the child is stopped.

    The watchdog arms its parent-death signal itself, once its handler is in
    place, then checks that its parent still lives: a parent killed while the
    watchdog was still starting is noticed, not missed (armed before exec, the
    SIGTERM used to kill a starting watchdog before it could act).
    """
    started = process_start_time(pid)
    args = python_module("alflow.process", "guard", str(pid), str(started or 0), str(os.getpid()), str(interval))
    return start(args, death_signal=None, stdin=subprocess.DEVNULL)


def _guard_main(pid: int, started: int, parent: int, interval: float) -> int:
    """The watchdog of :func:`guard` (``python -m alflow.process guard PID START PARENT INTERVAL``)."""

    def fire(*_: Any) -> None:
        if alive(pid, started or None):
            kill_tree(pid)
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, fire)
    set_death_signal(signal.SIGTERM)  # armed only now that fire() handles it
    while alive(pid, started or None):
        if os.getppid() != parent:
            fire()
        time.sleep(interval)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "guard":
        sys.exit(_guard_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
    print("usage: python -m alflow.process guard PID START_TIME PARENT INTERVAL", file=sys.stderr)
    sys.exit(2)
