"""Labelling: run an oracle on frames, isolated and restartable, and store each label as it finishes.

Every single-point calculation runs in its own scratch directory
``WORKDIR/scratch/<hash16>-a<attempt>`` in a separate process
(``python -m alflow.label_worker``, own session, OMP/MKL/OpenBLAS threads =
``threads``), so a segfault or a memory blow-up of the code cannot take the
caller down. The wall-clock limit ``timeout_s`` is enforced by killing the
worker's whole process group (SIGKILL).

Failures are data: a failed attempt (``timeout``, ``crash`` = killed by a
signal or exited without a result, ``scf_not_converged``, ``missing_stress``,
``error``) is one JSON line in ``WORKDIR/failures.jsonl`` (frame hash, status,
error, log tail, attempt, parameters, final). Attempt k >= 1 uses the
parameters updated with ``fallback_parameters[(k - 1) % len]`` (nested dicts
merged); after ``1 + retries`` attempts the frame is finally failed and never
becomes a label.

Resume: each label is appended to the ``Dataset`` (one atomic shard) as soon
as it finishes. A rerun skips frames whose hash is in the dataset or recorded
as finally failed (``retry_failed=True`` tries those again), and continues an
interrupted frame at its next attempt. A kill at any moment loses at most the
calculations in flight and never duplicates a label.

Labelled frames carry ``REF_energy`` (eV; the force-consistent free energy where
the code reports one), ``REF_forces`` (eV/Å), ``REF_stress`` (eV/Å³ Voigt, only
for 3D-periodic cells and oracles that give stress) and provenance:
``labeller`` (oracle name), ``source`` ("dft", "teacher" or "reference"; an
explorer's own ``source`` moves to ``origin``), ``timestamp``, ``status``
"labelled", ``oracle_key`` (hash of oracle, parameters and k-point density),
``attempt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms

from alflow.config import LabellingConfig
from alflow.data import Dataset
from alflow.io import frame_hash
from alflow.keys import FRAME_HASH, LABELLER, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE, STATUS, TIMESTAMP
from alflow.oracles import code_version, deep_merge, isolated_atom, source_of

__all__ = ["LabelResult", "Outcome", "label_frames", "read_failures", "reference_energies", "run_calculation"]

FAILURES = "failures.jsonl"
LABELLED = "labelled.jsonl"
LOG_TAIL = 4000  # characters of log kept in a failure record
KILL_SLACK_S = 5.0  # waiting for a killed process group to go
WORKER_PYTHONPATH = "worker_pythonpath"  # reserved parameter: extra import path of the worker only (teachers)
PERIODIC_REFERENCE = ("gpaw", "espresso", "cp2k", "vasp")  # codes that need a box for an isolated atom


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
    n_skipped: int  # already in the dataset or already finally failed
    n_attempts: int  # calculations started by this call
    elapsed_s: float
    workdir: Path
    dataset: Path
    failures: Path


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
    """Environment of a worker: thread counts, and the caller's import path (plus ``worker_pythonpath``) first."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    prefixes = tuple({sys.prefix, sys.base_prefix})
    extra = [str(Path(p).resolve()) for p in pythonpath] + [os.getcwd()]
    extra += [p for p in sys.path if p and not p.startswith(prefixes)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra + env.get("PYTHONPATH", "").split(os.pathsep))).strip(os.pathsep)
    return env


_RUNNING_LOCK = threading.Lock()


def kill_running(running: set[int]) -> int:
    """SIGKILL the process groups of the workers in ``running`` (filled by ``run_calculation``); how many."""
    with _RUNNING_LOCK:
        pids = list(running)
    for pid in pids:
        _killpg(pid)
    return len(pids)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
) -> Outcome:
    """Run ``oracle`` on ``atoms`` in a fresh ``taskdir`` in a subprocess; never raises for oracle failures.

    ``parameters[WORKER_PYTHONPATH]`` (str or list, popped) is prepended to the
    worker's import path only: a teacher whose dependencies clash with the
    main environment (sevenn needs e3nn 0.6, mace-torch pins 0.4.4) lives in a
    ``pip install --target`` directory. ``running`` (optional set) holds the
    worker's process-group id while it runs, for ``kill_running``.
    """
    taskdir = Path(taskdir).resolve()
    running = set() if running is None else running
    parameters = dict(parameters)
    extra_path = parameters.pop(WORKER_PYTHONPATH, None) or []
    extra_path = [extra_path] if isinstance(extra_path, str) else list(extra_path)
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
            "properties": list(properties), "gamma_only": gamma_only, "threads": threads}
    (taskdir / "task.json").write_text(json.dumps(task, default=str))
    t0 = time.monotonic()
    with open(taskdir / "worker.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alflow.label_worker", str(taskdir), "--parent", str(os.getpid())], cwd=taskdir,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_worker_env(threads, extra_path), start_new_session=True)
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
        _killpg(proc.pid)  # stray children of the code (e.g. cp2k_shell)
    elapsed = time.monotonic() - t0
    if timed_out:
        return Outcome("timeout", None, f"wall-clock limit {timeout_s:g} s exceeded; process group killed",
                       _log_tail(taskdir), elapsed)
    if (taskdir / "result.json").is_file() and code == 0:
        return Outcome("labelled", json.loads((taskdir / "result.json").read_text()), "", "", elapsed)
    if (taskdir / "error.json").is_file():
        err = json.loads((taskdir / "error.json").read_text())
        return Outcome(err["status"], None, err["error"], _log_tail(taskdir), elapsed)
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    return Outcome("crash", None, f"worker {how} without a result", _log_tail(taskdir), elapsed)


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


def _attempt_parameters(config: LabellingConfig, attempt: int) -> dict[str, Any]:
    if attempt == 0 or not config.fallback_parameters:
        return dict(config.parameters)
    return deep_merge(config.parameters, config.fallback_parameters[(attempt - 1) % len(config.fallback_parameters)])


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
                     "oracle_key": oracle_key(config.oracle, params, config.kpoint_density), "attempt": attempt})
    return out


def _label_one(atoms: Atoms, h: str, first_attempt: int, config: LabellingConfig, workdir: Path,
               lock: threading.Lock, keep_scratch: bool, stop: threading.Event,
               running: set[int]) -> tuple[Atoms | None, int]:
    """All attempts for one frame; returns (labelled frame or None, attempts made). ``stop``: caller interrupted."""
    made = 0
    for attempt in range(first_attempt, config.retries + 1):
        if stop.is_set():
            return None, made
        params = _attempt_parameters(config, attempt)
        taskdir = workdir / "scratch" / f"{h[:16]}-a{attempt}"
        out = run_calculation(atoms, config.oracle, params, taskdir, kpoint_density=config.kpoint_density,
                              timeout_s=config.timeout_s, threads=config.threads, running=running)
        made += 1
        if stop.is_set():  # killed because the caller was interrupted: not the oracle's failure, no record
            return None, made
        if out.status == "labelled":
            _append_jsonl(workdir / LABELLED, {"frame_hash": h, "attempt": attempt, "elapsed_s": out.elapsed_s,
                                               "compute_s": out.result.get("elapsed_s"), "oracle": config.oracle}, lock)
            if not keep_scratch:
                shutil.rmtree(taskdir, ignore_errors=True)
            return _labelled_frame(atoms, out.result, config, params, attempt), made
        _append_jsonl(workdir / FAILURES, {
            "frame_hash": h, "status": out.status, "error": out.error, "log_tail": out.log_tail,
            "attempt": attempt, "final": attempt >= config.retries, "oracle": config.oracle, "parameters": params,
            "elapsed_s": round(out.elapsed_s, 3), "scratch": str(taskdir),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{k: atoms.info[k] for k in ("walker", "step", "iteration") if k in atoms.info},
        }, lock)
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
    """Label ``frames`` with ``config``'s oracle, appending each label to ``dataset`` as it finishes (module docstring)."""
    t0 = time.monotonic()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    unique: dict[str, Atoms] = {}
    for atoms in frames:
        unique.setdefault(frame_hash(atoms), atoms)
    done = ds.hashes
    records = read_failures(workdir / FAILURES)
    final = {r["frame_hash"] for r in records if r.get("final")}
    next_attempt: dict[str, int] = {}
    for r in records:
        next_attempt[r["frame_hash"]] = max(next_attempt.get(r["frame_hash"], 0), int(r["attempt"]) + 1)
    todo = []
    for h, atoms in unique.items():
        if h in done or (h in final and not retry_failed):
            continue
        start = 0 if h in final else next_attempt.get(h, 0)
        todo.append((h, atoms, start))
    n_done = n_failed = n_attempts = 0
    lock = threading.Lock()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"label [{config.oracle}]", unit="frame", file=sys.stderr, dynamic_ncols=True)
    stop, running = threading.Event(), set()
    pool = ThreadPoolExecutor(max_workers=max(1, int(max_workers)))
    try:
        pending = {pool.submit(_label_one, atoms, h, start, config, workdir, lock, keep_scratch, stop, running)
                   for h, atoms, start in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                labelled, made = fut.result()
                n_attempts += made
                if labelled is None:
                    n_failed += 1
                else:
                    ds.append(labelled)
                    n_done += 1
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
    return LabelResult(n_frames=len(unique), n_labelled=n_done, n_failed=n_failed, n_skipped=len(unique) - len(todo),
                       n_attempts=n_attempts, elapsed_s=time.monotonic() - t0, workdir=workdir, dataset=ds.path,
                       failures=workdir / FAILURES)


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
    entry = stored.get(key, {"oracle": oracle_cfg.oracle, "parameters": oracle_cfg.parameters, "box": box,
                             "version": code_version(oracle_cfg.oracle), "energies": {}})
    missing = [e for e in elements if e not in entry["energies"]]
    work = Path(workdir) if workdir is not None else cache / "reference-work"
    periodic = oracle_cfg.oracle in PERIODIC_REFERENCE
    for symbol in missing:
        atoms = isolated_atom(symbol, box=box, periodic=periodic)
        outcome = None
        for attempt in range(oracle_cfg.retries + 1):
            outcome = run_calculation(atoms, oracle_cfg.oracle, _attempt_parameters(oracle_cfg, attempt),
                                      work / f"{key}-{symbol}-a{attempt}", timeout_s=oracle_cfg.timeout_s,
                                      threads=oracle_cfg.threads, properties=("energy",), gamma_only=True)
            if outcome.status == "labelled":
                break
        if outcome is None or outcome.status != "labelled":
            raise RuntimeError(f"reference energy of isolated {symbol} with oracle {oracle_cfg.oracle!r} failed "
                               f"({outcome.status}: {outcome.error})\n{outcome.log_tail}")
        entry["energies"][symbol] = float(outcome.result["energy"])
        stored = json.loads(path.read_text()) if path.is_file() else {}  # merge with concurrent writers
        stored[key] = deep_merge(stored.get(key, entry), entry)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
    return {e: float(entry["energies"][e]) for e in elements}

