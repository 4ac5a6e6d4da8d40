"""The Prefect API of one ``alflow run``: a configured server that must answer, or a temporary one that dies with the run.

``prefect_api(run_dir, timeout)`` is entered before the flow starts:

- with ``PREFECT_API_URL`` set (environment, profile or ``prefect.toml``), the server
  must answer ``GET /health`` within ``timeout`` seconds; otherwise
  :class:`PrefectUnreachable` says so at once (a server that accepts connections and
  never answers used to leave the run silent for more than 7 minutes: Prefect's
  client waits 60 s per request and retries);
- without it, Prefect's temporary server (ephemeral mode, ``SubprocessASGIServer``)
  is started here rather than lazily inside the flow, recorded in
  ``<run_dir>/prefect-server.json`` and guarded (``alflow.process.guard``): when
  ``alflow run`` dies, even by SIGKILL, the watchdog kills the server; a server that
  still escaped (the watchdog killed too) is killed by the next ``alflow run`` of
  the same run directory (``alflow.process.reap``). Prefect's own clients find the
  same server (it is a per-process singleton). Prefect stops it at exit, after its log
  and event workers have drained into it.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alflow.errors import RuntimeFailure

PIDFILE = "prefect-server.json"


class PrefectUnreachable(RuntimeFailure):
    """The configured Prefect API does not answer (exit code 1)."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, profile, ``prefect.toml``), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_api(url: str, timeout: float) -> None:
    """Raise :class:`PrefectUnreachable` unless the API at ``url`` answers ``GET /health`` within ``timeout`` s.

    Any HTTP answer counts (a server that needs a key answers 401): only silence and
    refused connections fail.
    """
    health = url.rstrip("/") + "/health"
    fix = ("start the server (`prefect server start`), fix PREFECT_API_URL, or unset it to let `alflow run` "
           "start a temporary server")
    try:
        with urllib.request.urlopen(health, timeout=timeout) as answer:  # noqa: S310 - the user's own API URL
            answer.read(1024)
    except urllib.error.HTTPError:
        return  # it answered
    except (TimeoutError, socket.timeout) as err:
        raise PrefectUnreachable(f"the Prefect API at PREFECT_API_URL={url} did not answer GET /health within "
                                 f"{timeout:g} s ({err}); {fix}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise PrefectUnreachable(f"the Prefect API at PREFECT_API_URL={url} did not answer GET /health within "
                                     f"{timeout:g} s ({reason}); {fix}") from None
        raise PrefectUnreachable(f"no Prefect server answers at PREFECT_API_URL={url} ({reason}); {fix}") from None


@contextlib.contextmanager
def prefect_api(run_dir: str | Path, timeout: float = 30.0,
                say: Callable[[str], None] = print) -> Iterator[str | None]:
    """The API URL the flow will report to (module docstring); None when Prefect will refuse ephemeral mode."""
    from alflow.process import forget, guard, reap, record, stop

    pidfile = Path(run_dir) / PIDFILE
    reaped = reap(pidfile)
    if reaped:
        say(f"stopped {len(reaped)} temporary Prefect server(s) left running by a killed run (pid "
            f"{', '.join(map(str, reaped))})")
    url = configured_api_url()
    if url:
        check_api(url, timeout)
        yield url
        return
    from prefect.settings import PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        yield None  # Prefect itself says what to do
        return
    from prefect.server.api.server import SubprocessASGIServer

    guarded: dict[str, Any] = {}

    def forget_server() -> None:  # runs at exit after Prefect stopped the server (atexit is last in, first out)
        process = guarded.get("process")
        if process is not None and process.poll() is None:  # Prefect did not stop it
            stop(process, grace=5.0)
        if process is not None:
            forget(pidfile, process.pid)
        stop(guarded.get("watchdog"), grace=1.0)

    atexit.register(forget_server)  # before server.start() registers Prefect's own stop
    server = SubprocessASGIServer()  # the instance Prefect's clients use in ephemeral mode
    server.start()  # waits up to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, then raises with a message
    process = server.server_process
    say(f"Prefect: temporary server on {server.api_url} (it stops with this run)")
    if process is not None and "process" not in guarded:
        guarded["process"] = process
        guarded["watchdog"] = guard(process.pid)  # before the record: a recorded server is a guarded one
        record(pidfile, process.pid, f"prefect temporary server {server.api_url}")
    # Prefect stops the server at exit, after its log and event workers have drained into it; stopping it
    # here would lose the last log lines. Until then the watchdog kills it if this process dies.
    yield server.api_url
