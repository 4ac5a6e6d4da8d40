"""Labelling: run an oracle on frames, isolated and restartable, and store each label as it finishes.

Every single-point calculation runs in its own scratch directory
``WORKDIR/scratch/<pid>-<8 hex>/<hash16>-a<attempt>`` (``scratch_dir``: one directory per labelling
process, so two processes never touch each other's files) in a separate process
(``python -m alflow.label_worker``, own session, OMP/MKL/OpenBLAS threads =
``threads``), so a segfault or a memory blow-up of the code cannot take the
caller down. The wall-clock limit ``timeout_s`` is enforced by killing the
worker's whole process group (SIGKILL).

Failures are data: a failed attempt (``timeout``, ``crash`` = killed by a
signal or exited without a result, ``scf_not_converged``, ``missing_stress``,
``invalid_result`` = wrong shape or non-finite numbers, ``rejected`` = the
dataset refused the labelled frame, ``error``) is one JSON line in
``WORKDIR/failures.jsonl`` (frame hash, status, error, log tail, attempt,
parameters, ``settings_key``, final). Attempt k >= 1 uses the parameters
updated with ``fallback_parameters[(k - 1) % len]`` (nested dicts merged);
after ``1 + retries`` attempts the frame is finally failed with these settings.

Oracle settings (``settings_key``): a hash of the labelling settings that decide
whether a calculation succeeds (oracle, parameters, fallbacks, k-point density,
timeout, retries, threads, memory limit, code version), keyed (HMAC) with the
work directory's owner-only random salt ``WORKDIR/.settings-salt``. Failure records are keyed
by frame *and* settings: a frame that finally failed is skipped only while the
settings are the same (``retry_failed=True`` tries it anyway); after a fixed
typo or another oracle it is tried again. Only the hash of the settings is
compared, so secrets in parameters never need to be read back.

Before the first calculation the oracle is built once in a probe worker on the
first frame to label (``probe_oracle``): an unknown module, a misspelt parameter
or a missing executable is an ``OracleError`` naming the oracle, not one failure
record per frame. Frames whose structure the dataset would reject (flat cell,
coincident atoms, absurd coordinates: ``alflow.io.validate_structure``) never
reach the oracle; they are listed in ``LabelResult.rejected``.

Resume: each label is appended to the ``Dataset`` (one atomic shard) as soon
as it finishes. A rerun skips frames whose hash is in the dataset or recorded
as finally failed with the same settings, and continues an interrupted frame
at its next attempt. A kill at any moment loses at most the calculations in
flight and never duplicates a label.

One labeller at a time (``labelling_lock``): ``label_frames`` holds an exclusive
``fcntl.flock`` on ``DATASET/.labelling.lock`` and ``WORKDIR/.labelling.lock``
for its whole run; a second process fails at once with ``LabellingBusy`` naming
the holder's pid, host, start time and command. The kernel releases the lock
when the holder dies, even by SIGKILL.

Labels with ``max |F|`` above ``max_force_warning`` (eV/Å; overlapping atoms)
are stored and reported (``LabelResult.high_force`` and a warning on the
``alflow.label`` logger).

Labelled frames carry ``REF_energy`` (eV; the force-consistent free energy where
the code reports one), ``REF_forces`` (eV/Å), ``REF_stress`` (eV/Å³ Voigt, only
for 3D-periodic cells and oracles that give stress) and provenance:
``labeller`` (oracle name), ``source`` ("dft", "teacher" or "reference"; an
explorer's own ``source`` moves to ``origin``), ``timestamp``, ``status``
"labelled", ``oracle_key`` (hash of oracle, parameters with secrets redacted and k-point density),
``attempt``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import uuid
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms

from alflow.config import LabellingConfig
from alflow.data import Dataset, DatasetBusy, exclusive_lock
from alflow.io import DatasetError, frame_hash, validate_structure
from alflow.keys import FRAME_HASH, LABELLER, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE, STATUS, TIMESTAMP
from alflow.oracles import OracleError, code_version, deep_merge, isolated_atom, source_of
from alflow.fileio import atomic_write_json, atomic_write_text
from alflow.process import python_module
from alflow.secrets import MissingEnvVar, expand_env, redact, scrub, secret_values

__all__ = ["LabelResult", "LabellingBusy", "Outcome", "label_frames", "labelling_lock", "probe_oracle",
           "read_failures", "reference_energies", "run_calculation", "scratch_dir", "settings_key",
           "settings_salt"]

log = logging.getLogger("alflow.label")

FAILURES = "failures.jsonl"
LABELLED = "labelled.jsonl"
LOG_TAIL = 4000  # characters of log kept in a failure record
SCRUB_MAX_BYTES = 64_000_000  # logs up to this size have secret values removed after the worker ends
KILL_SLACK_S = 5.0  # waiting for a killed process group to go
WORKER_PYTHONPATH = "worker_pythonpath"  # reserved parameter: extra import path of the worker only (teachers)
PERIODIC_REFERENCE = ("gpaw", "espresso", "cp2k", "vasp")  # codes that need a box for an isolated atom
PROBE_TIMEOUT_S = 600.0  # longest wait (s) for the probe that builds the oracle once before any calculation
SALT_FILE = ".settings-salt"
NOT_SETTINGS = ("max_force_warning", "max_in_flight")  # LabellingConfig fields that cannot change whether a calculation succeeds


@dataclass(frozen=True)
class Outcome:
    """One attempt: status "labelled" or a failure status, the worker's result, error text, log tail, seconds."""

    status: str
    result: dict[str, Any] | None
    error: str
    log_tail: str
    elapsed_s: float


@dataclass(frozen=True)
class LabelResult:
    """What ``label_frames`` did: counts for this call and where things are."""

    n_frames: int  # distinct frames given
    n_labelled: int  # labelled by this call
    n_failed: int  # finally failed in this call
    n_skipped: int  # n_in_dataset + n_failed_before
    n_attempts: int  # calculations started by this call
    elapsed_s: float
    workdir: Path
    dataset: Path
    failures: Path
    n_in_dataset: int = 0  # skipped: already in the dataset
    n_failed_before: int = 0  # skipped: finally failed before with the same settings (retry_failed tries them)
    rejected: tuple[tuple[str, str], ...] = ()  # (frame hash, reason): structure the dataset refuses; never sent
    high_force: tuple[tuple[str, float], ...] = ()  # (frame hash, max |F| eV/Å) of labels above max_force_warning
    settings_key: str = ""
    failed: frozenset[str] = field(default_factory=frozenset)  # hashes finally failed in this call

    @property
    def complete(self) -> bool:
        """Whether every distinct frame given is in the dataset now."""
        return self.n_in_dataset + self.n_labelled == self.n_frames


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _log_tail(taskdir: Path) -> str:
    """Tail of the worker log, plus the tail of the code's own log when there is one."""
    from alflow.oracles import LOG_FILES

    parts = []
    for name in dict.fromkeys(["worker.log", *LOG_FILES.values()]):
        text = _tail(taskdir / name)
        if text.strip():
            parts.append(f"--- {name} ---\n{text}")
    return "\n".join(parts)[-2 * LOG_TAIL :]


def _worker_env(threads: int, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    """Environment of a worker: thread counts, and an import path of only what is installed or named.

    The worker imports from the interpreter's own paths (site-packages and its ``.pth`` files), the
    user's ``PYTHONPATH`` (relative entries resolved against the working directory now, empty ones
    dropped) and ``worker_pythonpath`` (first) -- never from the caller's working directory or the
    worker's own (``PYTHONSAFEPATH=1``, see ``WORKER_COMMAND``), so a ``json.py`` lying there cannot run.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    extra = [str(Path(p).resolve()) for p in pythonpath]
    extra += [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra))
    if not env["PYTHONPATH"]:
        del env["PYTHONPATH"]
    env["PYTHONSAFEPATH"] = "1"  # no working/script directory on sys.path (Python >= 3.11), also in children
    return env


# ``-P`` (Python >= 3.11): ``-m`` does not put the working directory (the task directory) on sys.path
WORKER_COMMAND = tuple(python_module("alflow.label_worker"))


_RUNNING_LOCK = threading.Lock()


def kill_running(running: set[int]) -> int:
    """SIGKILL the workers in ``running`` (filled by ``run_calculation``) with all their descendants; how many."""
    with _RUNNING_LOCK:
        pids = list(running)
    for pid in pids:
        _killpg(pid)
    return len(pids)


def _killpg(pid: int) -> None:
    """SIGKILL worker ``pid``, its process group and every descendant, also those in a session of their own
    (the worker is their subreaper, see ``alflow.process``)."""
    from alflow.process import kill_tree

    kill_tree(pid)


def run_calculation(
    atoms: Atoms,
    oracle: str,
    parameters: dict[str, Any],
    taskdir: str | os.PathLike,
    *,
    kpoint_density: float | None = None,
    timeout_s: float = 3600.0,
    threads: int = 1,
    properties: Sequence[str] = ("energy", "forces", "stress"),
    gamma_only: bool = False,
    running: set[int] | None = None,
    memory_limit_gb: float | None = None,
    build_only: bool = False,
) -> Outcome:
    """Run ``oracle`` on ``atoms`` in a fresh ``taskdir`` in a subprocess; never raises for oracle failures.

    ``parameters[WORKER_PYTHONPATH]`` (str or list, popped) is prepended to the
    worker's import path only: a teacher whose dependencies clash with the
    main environment (sevenn needs e3nn 0.6, mace-torch pins 0.4.4) lives in a
    ``pip install --target`` directory. ``running`` (optional set) holds the
    worker's process-group id while it runs, for ``kill_running``. ``memory_limit_gb``: address-space limit
    (RLIMIT_AS, GB = 1e9 bytes) of the worker and the code it runs; exceeding it fails the attempt (MemoryError).
    The worker dies with this process (parent-death signal) and adopts its orphaned descendants (subreaper),
    so a timeout kills everything it started, even a child in a session of its own.
    ``build_only``: only build the calculator (``probe_oracle``); the result is the worker's answer.
    A result is checked by ``alflow.label_worker.validate_result`` here too: a bad one is
    ``invalid_result``, never a label.
    """
    taskdir = Path(taskdir).resolve()
    running = set() if running is None else running
    parameters = dict(parameters)
    extra_path = parameters.pop(WORKER_PYTHONPATH, None) or []
    extra_path = [extra_path] if isinstance(extra_path, str) else list(extra_path)
    try:
        extra_path = expand_env(extra_path, f"labelling.parameters.{WORKER_PYTHONPATH}")
    except MissingEnvVar as err:
        return Outcome("error", None, f"OracleError: {err}", "", 0.0)
    shutil.rmtree(taskdir, ignore_errors=True)
    taskdir.mkdir(parents=True)
    bare = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if atoms.has("initial_magmoms"):
        bare.set_initial_magnetic_moments(atoms.get_initial_magnetic_moments())
    ase.io.write(taskdir / "input.extxyz", bare, format="extxyz")
    frame = {"numbers": bare.numbers.tolist(), "positions": bare.positions.tolist(), "cell": bare.cell.tolist(),
             "pbc": bare.pbc.tolist(),
             "magmoms": bare.get_initial_magnetic_moments().tolist() if bare.has("initial_magmoms") else None}
    task = {"atoms": frame, "oracle": oracle, "parameters": parameters, "kpoint_density": kpoint_density,
            "properties": list(properties), "gamma_only": gamma_only, "threads": threads, "build_only": build_only}
    atomic_write_json(taskdir / "task.json", task, mode=0o600)  # may hold a literal secret: owner only
    t0 = time.monotonic()
    with open(taskdir / "worker.log", "wb") as log:
        from alflow.process import start

        proc = start([*WORKER_COMMAND, str(taskdir), "--parent", str(os.getpid())], cwd=taskdir,
                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_worker_env(threads, extra_path),
                     subreaper=True, memory_limit_bytes=None if memory_limit_gb is None else int(memory_limit_gb * 1e9))
        with _RUNNING_LOCK:
            running.add(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            code = proc.wait(timeout=KILL_SLACK_S)
            timed_out = True
        except BaseException:  # interrupted caller: take the calculation down with it
            _killpg(proc.pid)
            proc.wait(timeout=KILL_SLACK_S)
            raise
        finally:
            with _RUNNING_LOCK:
                running.discard(proc.pid)
        try:  # stray children of the code left in its group (the worker killed its other descendants itself)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elapsed = time.monotonic() - t0
    _forget_secrets(taskdir, task)
    if timed_out:
        return Outcome("timeout", None, f"wall-clock limit {timeout_s:g} s exceeded; the worker and every process "
                       "it started were killed",
                       _log_tail(taskdir), elapsed)
    if (taskdir / "result.json").is_file() and code == 0:
        from alflow.label_worker import InvalidResult, validate_result

        result = json.loads((taskdir / "result.json").read_text())
        if build_only:
            return Outcome("labelled", result, "", "", elapsed)
        try:
            result = validate_result(result, len(atoms), forces_expected="forces" in properties)
        except InvalidResult as err:
            return Outcome("invalid_result", None, f"InvalidResult: {err}", _log_tail(taskdir), elapsed)
        return Outcome("labelled", result, "", "", elapsed)
    if (taskdir / "error.json").is_file():
        err = json.loads((taskdir / "error.json").read_text())
        return Outcome(err["status"], None, err["error"], _log_tail(taskdir), elapsed)
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    return Outcome("crash", None, f"worker {how} without a result", _log_tail(taskdir), elapsed)


def _forget_secrets(taskdir: Path, task: dict[str, Any]) -> None:
    """Once the worker is gone: a kept task directory holds no secret of the parameters.

    ``task.json`` gets the redacted parameters (``alflow.secrets.redact``; ``${VAR}`` references stay,
    so the task can be rerun by hand), and the worker's log, its error record and the code's log have
    the secret values (literal ones, and the values of referenced env vars) replaced by "<redacted>".
    """
    from alflow.oracles import LOG_FILES

    parameters = task["parameters"]
    if redact(parameters) != parameters:
        atomic_write_json(taskdir / "task.json", {**task, "parameters": redact(parameters)})
    values = secret_values(parameters)
    if not values:
        return
    for name in dict.fromkeys(["worker.log", "error.json", *LOG_FILES.values()]):
        path = taskdir / name
        try:
            if not path.is_file() or path.stat().st_size > SCRUB_MAX_BYTES:
                continue
            text = path.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (clean := scrub(text, values)) != text:
            atomic_write_text(path, clean)


# --------------------------------------------------------------------------------- records
def _append_jsonl(path: Path, record: dict[str, Any], lock: threading.Lock) -> None:
    line = json.dumps(record, default=str) + "\n"
    with lock, open(path, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_failures(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of ``failures.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def oracle_key(oracle: str, parameters: dict[str, Any], kpoint_density: float | None, extra: Any = None) -> str:
    """Short hash of what determines a label (oracle, parameters, k-point density, code version)."""
    blob = json.dumps([oracle.lower(), parameters, kpoint_density, code_version(oracle), extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_key(config: LabellingConfig, salt: bytes = b"") -> str:
    """Short keyed hash of the labelling settings that decide whether a calculation succeeds (module docstring).

    Every ``LabellingConfig`` field except ``NOT_SETTINGS``, plus the code version, as HMAC-SHA256 with
    ``salt`` (``label_frames`` uses the work directory's ``settings_salt``). Only the hash is stored with
    a failure, so a secret in ``parameters`` is never needed to compare settings; keyed with a salt that
    only the owner can read, the stored hash cannot be used to guess a weak secret offline either.
    """
    fields = {k: v for k, v in config.model_dump().items() if k not in NOT_SETTINGS}
    if fields.get("mpi_command") is None:  # no launcher: the key of the settings before mpi_command existed
        fields.pop("mpi_command", None)
        fields.pop("cores_per_calculation", None)
    blob = json.dumps([fields, code_version(config.oracle)], sort_keys=True, default=str)
    return hmac.new(salt, blob.encode(), hashlib.sha256).hexdigest()[:16]


def settings_salt(workdir: str | os.PathLike) -> bytes:
    """The work directory's random salt for ``settings_key`` (``WORKDIR/.settings-salt``, owner-only, made once)."""
    path = Path(workdir) / SALT_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        salt = os.urandom(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, salt.hex() + "\n", mode=0o600)
        return salt


# ------------------------------------------------------------------------- scratch and locking
def scratch_dir(workdir: str | os.PathLike) -> Path:
    """A new directory ``WORKDIR/scratch/<pid>-<8 hex>`` that belongs to this call of this process only.

    The one place labelling scratch directories come from: two processes (or two calls) never share
    one, so neither can delete the other's calculations.
    """
    path = Path(workdir) / "scratch" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


LabellingBusy = DatasetBusy  # another process labels into the same dataset or work directory (exit code 1)
labelling_lock = exclusive_lock  # flock DIR/.labelling.lock of each directory, fail fast naming the holder


def probe_oracle(config: LabellingConfig, atoms: Atoms, workdir: str | os.PathLike) -> dict[str, Any]:
    """Build ``config``'s oracle once for ``atoms`` in a worker, without calculating; OracleError if that fails.

    Runs in a worker like every calculation (same environment, ``worker_pythonpath``), so teachers with
    clashing dependencies are checked where they run. Waits at most ``min(timeout_s, PROBE_TIMEOUT_S)``.
    Returns the worker's answer (``calculator``: class name, ``stress_supported``).
    """
    scratch = scratch_dir(workdir)
    params = _attempt_parameters(config, 0)
    out = run_calculation(atoms, config.oracle, params, scratch / "probe",
                          kpoint_density=config.kpoint_density, timeout_s=min(config.timeout_s, PROBE_TIMEOUT_S),
                          threads=config.threads, build_only=True, memory_limit_gb=config.memory_limit_gb)
    if out.status != "labelled":
        names = ", ".join(sorted(config.parameters)) or "none"
        raise OracleError(
            f"labelling.oracle {config.oracle!r} (parameters: {names}) cannot be built: "
            f"{scrub(out.error, secret_values(params))}; nothing was calculated (log: "
            f"{scratch / 'probe' / 'worker.log'}). Fix the oracle or its parameters and rerun.")
    shutil.rmtree(scratch, ignore_errors=True)
    return out.result or {}


def _attempt_parameters(config: LabellingConfig, attempt: int) -> dict[str, Any]:
    if attempt == 0 or not config.fallback_parameters:
        return _launched(config, dict(config.parameters))
    return _launched(config, deep_merge(config.parameters,
                                        config.fallback_parameters[(attempt - 1) % len(config.fallback_parameters)]))


def mpi_launched_command(config: LabellingConfig, parameters: dict[str, Any]) -> str | list[str] | None:
    """The code's command behind ``labelling.mpi_command`` (``{cores}`` = ``cores_per_calculation``), or None.

    The code's own command is ``parameters.command``, else the oracle's environment variable
    (VASP's ``ASE_VASP_COMMAND``), else its default executable (``pw.x``, ``cp2k_shell``):
    ``srun -n {cores}`` + ``pw.x`` runs QE as ``srun -n 8 pw.x`` inside the label task's batch job.
    """
    if not config.mpi_command:
        return None
    from alflow.oracles import ORACLES, command_argv

    spec = ORACLES.get(config.oracle)
    command = parameters.get("command")
    if command is None and spec is not None:
        command = next((os.environ[v] for v in spec.env_command if os.environ.get(v)), None) or spec.executable
    if command is None:
        raise OracleError(f"labelling.mpi_command: oracle {config.oracle!r} has no command to launch; "
                          "set labelling.parameters.command")
    launcher = shlex.split(config.mpi_command.format(cores=config.cores_per_calculation))
    code = command_argv(command, "labelling.parameters.command")
    if code[: len(launcher)] == launcher:  # already launched (a command given with its launcher)
        return command
    return [*launcher, *code] if isinstance(command, (list, tuple)) else shlex.join([*launcher, *code])


def _launched(config: LabellingConfig, parameters: dict[str, Any]) -> dict[str, Any]:
    command = mpi_launched_command(config, parameters)
    return parameters if command is None else {**parameters, "command": command}


def _labelled_frame(atoms: Atoms, result: dict[str, Any], config: LabellingConfig, params: dict, attempt: int) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update({k: v for k, v in atoms.info.items() if k not in (REF_ENERGY, REF_STRESS, FRAME_HASH)})
    if SOURCE in out.info:
        out.info["origin"] = out.info.pop(SOURCE)
    out.info[REF_ENERGY] = float(result["energy"])
    out.arrays[REF_FORCES] = np.asarray(result["forces"], dtype=float)
    if result.get("stress") is not None:
        out.info[REF_STRESS] = np.asarray(result["stress"], dtype=float)
    out.info.update({LABELLER: config.oracle, SOURCE: source_of(config.oracle), STATUS: "labelled",
                     TIMESTAMP: datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "oracle_key": oracle_key(config.oracle, redact(params), config.kpoint_density),  # no secret in it
                     "attempt": attempt})
    return out


def _describe(atoms: Atoms, h: str, index: int | None = None) -> str:
    """``frame 3 (hash 1a2b3c4d5e6f, walker 1, step 40)``: how messages name a frame."""
    extra = [f"{k} {atoms.info[k]}" for k in ("walker", "step", "iteration") if k in atoms.info]
    head = "frame" if index is None else f"frame {index}"
    return f"{head} (hash {h[:12]}{''.join(', ' + e for e in extra)})"


def _failure_record(atoms: Atoms, h: str, status: str, error: str, log_tail: str, attempt: int, final: bool,
                    config: LabellingConfig, params: dict, key: str, elapsed_s: float, scratch: Path | None) -> dict:
    return {
        "frame_hash": h, "status": status, "error": scrub(error, secret_values(params)),
        "log_tail": scrub(log_tail, secret_values(params)),
        "attempt": attempt, "final": final, "oracle": config.oracle, "parameters": redact(params), "settings_key": key,
        "elapsed_s": round(elapsed_s, 3), "scratch": None if scratch is None else str(scratch),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: atoms.info[k] for k in ("walker", "step", "iteration") if k in atoms.info},
    }


def _label_one(atoms: Atoms, h: str, first_attempt: int, config: LabellingConfig, workdir: Path, scratch: Path,
               key: str, lock: threading.Lock, keep_scratch: bool, stop: threading.Event,
               running: set[int]) -> tuple[Atoms | None, int]:
    """All attempts for one frame; returns (labelled frame or None, attempts made). ``stop``: caller interrupted."""
    made = 0
    for attempt in range(first_attempt, config.retries + 1):
        if stop.is_set():
            return None, made
        params = _attempt_parameters(config, attempt)
        taskdir = scratch / f"{h[:16]}-a{attempt}"
        out = run_calculation(atoms, config.oracle, params, taskdir, kpoint_density=config.kpoint_density,
                              timeout_s=config.timeout_s, threads=config.threads, running=running,
                              memory_limit_gb=config.memory_limit_gb)
        made += 1
        if stop.is_set():  # killed because the caller was interrupted: not the oracle's failure, no record
            return None, made
        if out.status == "labelled":
            _append_jsonl(workdir / LABELLED, {"frame_hash": h, "attempt": attempt, "elapsed_s": out.elapsed_s,
                                               "compute_s": out.result.get("elapsed_s"), "oracle": config.oracle,
                                               "settings_key": key}, lock)
            if not keep_scratch:
                shutil.rmtree(taskdir, ignore_errors=True)
            return _labelled_frame(atoms, out.result, config, params, attempt), made
        _append_jsonl(workdir / FAILURES, _failure_record(atoms, h, out.status, out.error, out.log_tail, attempt,
                                                          attempt >= config.retries, config, params, key,
                                                          out.elapsed_s, taskdir), lock)
    return None, made


def label_frames(
    frames: Iterable[Atoms],
    config: LabellingConfig,
    dataset: Dataset | str | os.PathLike,
    workdir: str | os.PathLike,
    progress: bool = True,
    max_workers: int = 1,
    *,
    retry_failed: bool = False,
    keep_scratch: bool = False,
) -> LabelResult:
    """Label ``frames`` with ``config``'s oracle, appending each label to ``dataset`` as it finishes (module docstring).

    Raises ``LabellingBusy`` when another process labels into ``dataset`` or ``workdir``, and
    ``OracleError`` when the oracle cannot be built (before any calculation).
    """
    t0 = time.monotonic()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with labelling_lock(ds.path, workdir):
        key = settings_key(config, settings_salt(workdir))
        return _label_locked(frames, config, ds, workdir, key, t0, progress, max_workers, retry_failed, keep_scratch)


def _label_locked(frames: Iterable[Atoms], config: LabellingConfig, ds: Dataset, workdir: Path, key: str, t0: float,
                  progress: bool, max_workers: int, retry_failed: bool, keep_scratch: bool) -> LabelResult:
    unique: dict[str, tuple[int, Atoms]] = {}
    for i, atoms in enumerate(frames):
        unique.setdefault(frame_hash(atoms), (i, atoms))
    done = ds.hashes
    records = [r for r in read_failures(workdir / FAILURES) if r.get("settings_key") == key]  # these settings only
    final = {r["frame_hash"] for r in records if r.get("final")}
    next_attempt: dict[str, int] = {}
    for r in records:
        next_attempt[r["frame_hash"]] = max(next_attempt.get(r["frame_hash"], 0), int(r["attempt"]) + 1)
    todo, rejected = [], []
    n_in_dataset = n_failed_before = 0
    for h, (i, atoms) in unique.items():
        if h in done:
            n_in_dataset += 1
            continue
        if h in final and not retry_failed:
            n_failed_before += 1
            continue
        try:  # what the dataset would refuse never reaches the oracle
            validate_structure(atoms, _describe(atoms, h, i), ds.species)
        except DatasetError as err:
            rejected.append((h, str(err)))
            log.warning("not labelled: %s", err)
            continue
        todo.append((h, atoms, 0 if h in final else next_attempt.get(h, 0)))
    if todo:
        probe_oracle(config, todo[0][1], workdir)
    n_done = n_failed = n_attempts = 0
    failed: set[str] = set()
    high_force: list[tuple[str, float]] = []
    lock = threading.Lock()
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"label [{config.oracle}]", unit="frame", file=sys.stderr, dynamic_ncols=True)
    stop, running = threading.Event(), set()
    scratch = scratch_dir(workdir)
    pool = ThreadPoolExecutor(max_workers=max(1, int(max_workers)))
    try:
        pending = {pool.submit(_label_one, atoms, h, start, config, workdir, scratch, key, lock, keep_scratch, stop,
                               running): (h, atoms) for h, atoms, start in todo}
        waiting = set(pending)
        while waiting:
            finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for fut in finished:
                h, atoms = pending[fut]
                labelled, made = fut.result()
                n_attempts += made
                if labelled is not None:
                    try:
                        ds.append(labelled)
                    except DatasetError as err:  # the label itself is unusable: a failure of this frame
                        _append_jsonl(workdir / FAILURES, _failure_record(
                            atoms, h, "rejected", f"the dataset refused the label: {err}", "",
                            int(labelled.info.get("attempt", 0)), True, config,
                            _attempt_parameters(config, int(labelled.info.get("attempt", 0))), key, 0.0, None), lock)
                        labelled = None
                if labelled is None:
                    n_failed += 1
                    failed.add(h)
                else:
                    n_done += 1
                    fmax = float(np.sqrt((np.asarray(labelled.arrays[REF_FORCES]) ** 2).sum(axis=1).max()))
                    if fmax > config.max_force_warning:
                        high_force.append((h, fmax))
                        log.warning("labelled %s has max |F| = %.1f eV/Å > max_force_warning %g eV/Å (overlapping "
                                    "atoms?); stored in %s; remove it with `alflow data remove %s --hash %s` if "
                                    "it is unphysical", _describe(labelled, h, unique[h][0]), fmax,
                                    config.max_force_warning, ds.path, ds.path, h[:12])
                if bar is not None:
                    bar.set_postfix(done=n_done, failed=n_failed, remaining=len(todo) - n_done - n_failed)
                    bar.update(1)
    except BaseException:  # Ctrl-C, or an error storing a label: stop the calculations in flight
        stop.set()
        kill_running(running)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        _remove_if_empty(scratch)
    return LabelResult(n_frames=len(unique), n_labelled=n_done, n_failed=n_failed,
                       n_skipped=n_in_dataset + n_failed_before, n_attempts=n_attempts,
                       elapsed_s=time.monotonic() - t0, workdir=workdir, dataset=ds.path, failures=workdir / FAILURES,
                       n_in_dataset=n_in_dataset, n_failed_before=n_failed_before, rejected=tuple(rejected),
                       high_force=tuple(high_force), settings_key=key, failed=frozenset(failed))


# ------------------------------------------------------------------------------ reference energies
def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ALFLOW_CACHE", Path.home() / ".cache" / "alflow"))


def reference_energies(
    oracle_cfg: LabellingConfig,
    elements: Iterable[str],
    cache_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    box: float = 10.0,
) -> dict[str, float]:
    """Energy (eV) of each isolated atom with ``oracle_cfg``, computed once and cached as JSON.

    The atom sits in a cubic ``box`` (Å; periodic, Γ-only, for the DFT codes in
    ``PERIODIC_REFERENCE``; open otherwise) with its Hund's-rule moment, so codes
    run spin-polarised where the atom has unpaired electrons. Cache file:
    ``cache_dir/reference_energies.json`` (default ``$ALFLOW_CACHE`` or
    ``~/.cache/alflow``), keyed by oracle, parameters, box and code version.
    RuntimeError (naming the element, status and log tail) when an atom fails.
    """
    elements = list(dict.fromkeys(elements))
    cache = _cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "reference_energies.json"
    key = oracle_key(oracle_cfg.oracle, oracle_cfg.parameters, None, {"box": box, "kind": "isolated-atom"})
    stored = json.loads(path.read_text()) if path.is_file() else {}
    entry = stored.get(key, {"oracle": oracle_cfg.oracle, "parameters": redact(oracle_cfg.parameters), "box": box,
                             "version": code_version(oracle_cfg.oracle), "energies": {}})
    missing = [e for e in elements if e not in entry["energies"]]
    work = scratch_dir(Path(workdir) if workdir is not None else cache / "reference-work")
    periodic = oracle_cfg.oracle in PERIODIC_REFERENCE
    for symbol in missing:
        atoms = isolated_atom(symbol, box=box, periodic=periodic)
        outcome = None
        for attempt in range(oracle_cfg.retries + 1):
            outcome = run_calculation(atoms, oracle_cfg.oracle, _attempt_parameters(oracle_cfg, attempt),
                                      work / f"{key}-{symbol}-a{attempt}", timeout_s=oracle_cfg.timeout_s,
                                      threads=oracle_cfg.threads, properties=("energy",), gamma_only=True,
                                      memory_limit_gb=oracle_cfg.memory_limit_gb)
            if outcome.status == "labelled":
                break
        if outcome is not None and outcome.status == "labelled":
            shutil.rmtree(work / f"{key}-{symbol}-a{attempt}", ignore_errors=True)
        if outcome is None or outcome.status != "labelled":
            raise RuntimeError(f"reference energy of isolated {symbol} with oracle {oracle_cfg.oracle!r} failed "
                               f"({outcome.status}: {outcome.error})\n{outcome.log_tail}")
        entry["energies"][symbol] = float(outcome.result["energy"])
        stored = json.loads(path.read_text()) if path.is_file() else {}  # merge with concurrent writers
        stored[key] = deep_merge(stored.get(key, entry), entry)
        atomic_write_text(path, json.dumps(stored, indent=1, sort_keys=True, default=str))
    _remove_if_empty(work)
    return {e: float(entry["energies"][e]) for e in elements}

