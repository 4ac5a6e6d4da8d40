"""The labelled dataset of an active-learning run, on disk, plus splits, E0 fit and summaries.

Storage: a dataset is a directory with ``shards/``. Each ``append`` writes ONE new
shard ``shards/<20-digit ns timestamp>-<8 hex>.extxyz`` via a temp file
(``.tmp-*``) in the same directory, fsync, ``os.replace`` and a directory fsync,
so a killed writer leaves at most a stray ``.tmp-*`` file, which readers ignore
and ``append`` deletes once it is older than ``STALE_TMP_S``. Readers load
shards in name order and keep the first frame of each content hash, so frames
never appear twice (racing writers, interrupted ``compact``). Concurrent
appenders in separate processes are safe: shard names are unique. A bad frame
in a batch rejects the whole batch before anything is written.

Content hash (``info[FRAME_HASH]``): sha256 over atomic numbers, cell and pbc and
positions, positions *not* wrapped. Positions are first quantised exactly as the
extxyz writer prints them (8 decimals) and then rounded to 1e-6 Å; the cell
(written in full precision) is rounded to 1e-6 Å. The hash therefore survives a
write/read round trip. Labels are not hashed: the same structure labelled twice
is stored once (first wins).

Validation at the door (``alflow.io.validate_frame``): besides the labels, a frame's structure must
be one training can use: finite coordinates within 1e5 Å, a periodic cell that is not flat, no two
atoms closer than 0.1 Å. The message names the file and frame.

Conflicts: a frame whose structure is already stored but whose labels differ (energy by more than
1e-6 eV, a force component by more than 1e-6 eV/Å, a stress component by more than 1e-8 eV/Å³) is
not stored (first wins) and is reported: ``import_report`` lists them, ``import_file`` and ``append``
log a warning naming them.

Removal (``remove``, ``alflow data remove``) is crash-safe through a journal: the frames to remove and
the shards holding them are written to ``removing.json`` (atomically) first; while it exists, readers
ignore those frames in those shards. The remaining frames of those shards are then merged into one new
shard, the old shards deleted, and the journal deleted. A kill at any point leaves the dataset either
before the removal or after it (the next ``remove`` or ``compact`` finishes the job).

One exclusive writer of this kind at a time: labelling (``alflow.label``) and removal hold an
``fcntl.flock`` on ``DATASET/.labelling.lock`` (``exclusive_lock``); a second one fails at once with
``DatasetBusy`` naming the holder.

Units: energies eV, forces eV/Å, stress eV/Å³ (Voigt xx yy zz yz xz xy, ASE sign).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import operator
import os
import re
import socket
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from alflow.fileio import atomic_write_json
from alflow.io import (
    TMP_PREFIX,
    DatasetError,
    _as_written,
    _species_numbers,
    clean_for_write,
    frame_hash,
    fsync_dir,
    labels_from_calc,
    read_frames,
    validate_frame,
    write_extxyz_atomic,
)
from alflow.errors import InputError, RuntimeFailure
from alflow.keys import FRAME_HASH, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE

__all__ = [
    "Conflict",
    "Dataset",
    "DatasetBusy",
    "DatasetError",
    "ImportReport",
    "exclusive_lock",
    "fit_e0",
    "format_summary",
    "frame_hash",
    "read_frames",
    "split",
    "summary",
    "validate_frame",
]

SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^(\d{20})-[0-9a-f]{8}\.extxyz$")
STALE_TMP_S = 3600.0  # a .tmp-* file untouched this long (s) belongs to a dead writer
JOURNAL = "removing.json"
LOCK_FILE = ".labelling.lock"
CONFLICT_ENERGY = 1e-6  # eV
CONFLICT_FORCE = 1e-6  # eV/Å
CONFLICT_STRESS = 1e-8  # eV/Å³

log = logging.getLogger("alflow.data")


class DatasetBusy(RuntimeFailure):
    """Another process labels into (or removes from) the same dataset or work directory (exit code 1)."""


def _lock_owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}: {info.get('command') or 'python'}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


@contextlib.contextmanager
def exclusive_lock(*directories: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``fcntl.flock`` on ``DIR/.labelling.lock`` of each directory.

    Raises ``DatasetBusy`` at once, naming the holder's pid, host, start time and command, when another
    process (or another call in this one) holds one. The kernel releases a lock when its holder dies,
    even by SIGKILL, so a killed labeller never blocks the next one.
    """
    fds: list[int] = []
    try:
        for directory in dict.fromkeys(Path(d).resolve() for d in directories):
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DatasetBusy(
                    f"{directory}: another process is labelling or removing frames here ({_lock_owner(path)}; "
                    f"lock {path}); wait for it to finish or stop it, then rerun (this one changed nothing)"
                ) from None
            fds.append(fd)
            owner = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # releases the flock


@dataclass(frozen=True)
class Conflict:
    """A frame whose structure is stored with other labels: where it came from, its hash, the differences."""

    where: str
    frame_hash: str
    index: int | None  # of the stored frame in the dataset (None: an earlier frame of the same batch)
    d_energy: float  # eV, |new - stored|
    d_force: float  # eV/Å, largest |component difference|
    d_stress: float | None  # eV/Å³, largest |component difference|; None when either has no stress

    def __str__(self) -> str:
        at = f"stored frame {self.index}" if self.index is not None else "an earlier frame of the same file"
        stress = "" if self.d_stress is None else f", stress by {self.d_stress:.3g} eV/Å³"
        return (f"{self.where} (hash {self.frame_hash[:12]}): same structure as {at} with other labels "
                f"(energy differs by {self.d_energy:.6g} eV, forces by up to {self.d_force:.3g} eV/Å{stress}); "
                f"the stored labels were kept")


@dataclass(frozen=True)
class ImportReport:
    """What an import did: new frames, frames already stored with the same labels, conflicts."""

    n_frames: int
    n_new: int
    n_same: int
    conflicts: tuple[Conflict, ...]


def _label_difference(new: Atoms, old: Atoms) -> tuple[float, float, float | None] | None:
    """(dE, dF, dS) when the labels of ``new`` and ``old`` (same structure) differ beyond the tolerances."""
    d_e = abs(float(new.info[REF_ENERGY]) - float(old.info[REF_ENERGY]))
    d_f = float(np.max(np.abs(np.asarray(new.arrays[REF_FORCES]) - np.asarray(old.arrays[REF_FORCES])), initial=0.0))
    d_s = None
    if REF_STRESS in new.info and REF_STRESS in old.info:
        d_s = float(np.max(np.abs(np.asarray(new.info[REF_STRESS], dtype=float)
                                  - np.asarray(old.info[REF_STRESS], dtype=float))))
    tol_e = CONFLICT_ENERGY + 1e-12 * abs(float(old.info[REF_ENERGY]))
    if d_e > tol_e or d_f > CONFLICT_FORCE or (d_s is not None and d_s > CONFLICT_STRESS):
        return d_e, d_f, d_s
    return None


class Dataset:
    """An append-only, deduplicated, crash-safe set of labelled frames in directory ``path``.

    ``species``: optional allow-list (symbols or atomic numbers) checked on append.
    ``create=False`` raises FileNotFoundError when ``path`` holds no dataset.
    """

    def __init__(self, path: str | os.PathLike, species: Iterable[int | str] | None = None, create: bool = True):
        self.path = Path(path)
        self.shard_dir = self.path / SHARD_DIR
        if not self.shard_dir.is_dir():
            if not create:
                raise FileNotFoundError(f"{self.path}: no dataset here (expected a directory with {SHARD_DIR}/)")
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.species = None if species is None else _species_numbers(species)
        self._cache: dict[str, list[Atoms]] = {}  # shard name -> frames as stored
        self._frames: list[Atoms] = []  # deduplicated, in shard-name order
        self._hashes: set[str] = set()
        self._index: dict[str, int] = {}  # hash -> position in self._frames
        self._journal: tuple[frozenset[str], frozenset[str]] | None = None  # (hashes, shards) being removed
        self._last_ts = 0

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r})"

    # -- reading -------------------------------------------------------------------------------------
    def _shard_names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.shard_dir) if SHARD_RE.match(n))

    def _read_shard(self, name: str) -> list[Atoms]:
        path = self.shard_dir / name
        try:
            frames = ase.io.read(path, index=":", format="extxyz")
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{path}: unreadable shard ({err})") from err
        for atoms in frames:
            labels_from_calc(atoms)
            atoms.info[FRAME_HASH] = frame_hash(atoms)
        return frames

    def _read_journal(self) -> tuple[frozenset[str], frozenset[str]] | None:
        try:
            data = json.loads((self.path / JOURNAL).read_text())
            return frozenset(data["hashes"]), frozenset(data["shards"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{self.path / JOURNAL}: unreadable removal journal ({err}); it lists frames being "
                               f"removed: fix or delete it") from err

    def _refresh(self) -> None:
        """Sync the in-memory view with shards on disk (other writers, compactions, removals)."""
        journal = self._read_journal()
        changed = journal != self._journal
        self._journal = journal
        for _attempt in range(20):
            names = self._shard_names()
            changed = changed or set(self._cache) != set(names)
            vanished = False
            for name in list(self._cache):
                if name not in names:
                    del self._cache[name]
            for name in names:
                if name not in self._cache:
                    try:
                        self._cache[name] = self._read_shard(name)
                    except FileNotFoundError:  # compacted away meanwhile: the merged shard holds it
                        vanished = True
                        break
            if not vanished:
                break
        else:  # pragma: no cover - only under a storm of compactions
            raise DatasetError(f"{self.path}: shards keep changing while reading; try again")
        if changed:
            self._rebuild()

    def _rebuild(self) -> None:
        self._frames, self._hashes, self._index = [], set(), {}
        gone, gone_from = self._journal or (frozenset(), frozenset())
        for name in sorted(self._cache):
            for atoms in self._cache[name]:
                h = atoms.info[FRAME_HASH]
                if h not in self._hashes and not (name in gone_from and h in gone):
                    self._hashes.add(h)
                    self._index[h] = len(self._frames)
                    self._frames.append(atoms)

    def frames(self) -> list[Atoms]:
        """All frames (copies), deduplicated, in storage order."""
        self._refresh()
        return [a.copy() for a in self._frames]

    def __len__(self) -> int:
        self._refresh()
        return len(self._frames)

    @property
    def hashes(self) -> frozenset[str]:
        """Content hashes of the stored frames."""
        self._refresh()
        return frozenset(self._hashes)

    # -- writing -------------------------------------------------------------------------------------
    def _new_shard_name(self, ts: int | None = None) -> str:
        if ts is None:
            ts = max(time.time_ns(), self._last_ts + 1)
            self._last_ts = ts
        return f"{ts:020d}-{uuid.uuid4().hex[:8]}.extxyz"

    def _clean_stale_tmp(self) -> None:
        now = time.time()
        for name in os.listdir(self.shard_dir):
            if name.startswith(TMP_PREFIX):
                path = self.shard_dir / name
                try:
                    if now - path.stat().st_mtime > STALE_TMP_S:
                        path.unlink()
                except OSError:
                    pass

    def _add(self, frames: Iterable[Atoms] | Atoms, wheres: Sequence[str], provenance: dict[str, Any]) -> ImportReport:
        batch = [frames] if isinstance(frames, Atoms) else list(frames)
        for atoms, where in zip(batch, wheres):
            validate_frame(atoms, where, self.species)
        prepared = []
        for atoms in batch:
            out = clean_for_write(atoms)
            out.positions = _as_written(out.positions)  # in memory == on disk
            out.arrays[REF_FORCES] = _as_written(out.arrays[REF_FORCES])
            for key, value in provenance.items():
                out.info.setdefault(key, value)
            out.info[FRAME_HASH] = frame_hash(out)
            prepared.append(out)
        self._refresh()
        new: list[Atoms] = []
        batch_first: dict[str, Atoms] = {}
        conflicts, n_same = [], 0
        for atoms, where in zip(prepared, wheres):
            h = atoms.info[FRAME_HASH]
            stored = self._frames[self._index[h]] if h in self._index else batch_first.get(h)
            if stored is None:
                batch_first[h] = atoms
                new.append(atoms)
                continue
            diff = _label_difference(atoms, stored)
            if diff is None:
                n_same += 1
            else:
                conflicts.append(Conflict(where, h, self._index.get(h), *diff))
        if new:
            name = self._new_shard_name()
            write_extxyz_atomic(new, self.shard_dir / name)
            self._cache[name] = new
            self._rebuild()
        self._clean_stale_tmp()
        return ImportReport(len(batch), len(new), n_same, tuple(conflicts))

    def _warn_conflicts(self, report: ImportReport) -> None:
        c = report.conflicts
        if c:
            log.warning("%s: %d frame(s) already stored with other labels, not stored (first wins): %s%s", self.path,
                        len(c), "; ".join(map(str, c[:5])), f"; and {len(c) - 5} more" if len(c) > 5 else "")

    def append(self, frames: Iterable[Atoms] | Atoms, source: str | None = None) -> int:
        """Validate then store ``frames`` (one shard); return how many were new.

        ``source`` fills ``info[SOURCE]`` where a frame has none. Any invalid frame
        rejects the whole batch (DatasetError) before anything is written. Conflicts
        (a stored structure with other labels) are not stored and are logged as a warning.
        """
        batch = [frames] if isinstance(frames, Atoms) else list(frames)
        wheres = [f"frame {i} of the batch appended to {self.path}" for i in range(len(batch))]
        report = self._add(batch, wheres, {} if source is None else {SOURCE: source})
        self._warn_conflicts(report)
        return report.n_new

    def import_file(self, path: str | os.PathLike, **provenance: Any) -> int:
        """Import labelled frames from any file ``read_frames`` reads; return how many were new.

        ``provenance`` (e.g. ``source="vasp"``, ``labeller="pbe"``) fills info keys a
        frame lacks; ``source`` defaults to ``"file"``. Unlabelled frames are an error.
        Conflicts (stored structures with other labels) are logged; ``import_report`` returns them.
        """
        report = self.import_report(path, **provenance)
        self._warn_conflicts(report)
        return report.n_new

    def import_report(self, path: str | os.PathLike, **provenance: Any) -> ImportReport:
        """``import_file``, returning new / same / conflicting counts and the conflicts (module docstring)."""
        frames = read_frames(path)
        if not frames:
            raise DatasetError(f"{path}: no frames found")
        wheres = [f"{path}, frame {i}" for i in range(len(frames))]
        for atoms, where in zip(frames, wheres):
            if REF_ENERGY not in atoms.info or REF_FORCES not in atoms.arrays:
                raise DatasetError(
                    f"{where}: no energy/forces labels; import needs labelled frames "
                    f"(info['{REF_ENERGY}'] and arrays['{REF_FORCES}'], or calculator results)"
                )
        provenance.setdefault(SOURCE, "file")
        return self._add(frames, wheres, provenance)

    def compact(self) -> int:
        """Merge all shards into one (atomically); return how many shards were merged (0: nothing to do).

        The merged shard sorts just before the first old one, so the order is kept;
        an interruption leaves duplicates that readers drop. An unfinished removal is finished first.
        """
        self._finish_removal()
        self._refresh()
        names = sorted(self._cache)
        if len(names) <= 1:
            return 0
        first_ts = int(SHARD_RE.match(names[0]).group(1))  # type: ignore[union-attr]
        merged = self._new_shard_name(ts=first_ts - 1)
        write_extxyz_atomic(self._frames, self.shard_dir / merged)
        for name in names:
            try:
                (self.shard_dir / name).unlink()
            except FileNotFoundError:
                pass
        fsync_dir(self.shard_dir)
        self._cache = {merged: list(self._frames)}
        self._rebuild()
        self._clean_stale_tmp()
        return len(names)

    # -- removal --------------------------------------------------------------------------------------
    def remove(self, indices: Iterable[int] = (), hashes: Iterable[str] = ()) -> list[Atoms]:
        """Remove frames by position (as in ``frames()``) and/or content hash (full, or a prefix of >= 8 hex
        digits); return the removed frames. Crash-safe through the removal journal (module docstring).

        Holds the dataset's exclusive lock (``DatasetBusy`` while a labeller runs). DatasetError naming the
        index or hash that does not exist; nothing is removed then.
        """
        with exclusive_lock(self.path):
            self._finish_removal()
            self._refresh()
            targets: dict[str, None] = {}
            for i in indices:
                if not -len(self._frames) <= int(i) < len(self._frames):
                    raise DatasetError(f"{self.path}: no frame {i}; expected an index in 0..{len(self._frames) - 1}")
                targets[self._frames[int(i)].info[FRAME_HASH]] = None
            for prefix in hashes:
                prefix = str(prefix).lower()
                found = [h for h in self._index if h.startswith(prefix)]
                if len(prefix) < 8 or len(found) != 1:
                    why = "too short (< 8 hex digits)" if len(prefix) < 8 else f"matches {len(found)} frames"
                    raise DatasetError(f"{self.path}: hash {prefix!r} {why}; expected a frame hash or a unique prefix")
                targets[found[0]] = None
            if not targets:
                return []
            removed = [self._frames[self._index[h]].copy() for h in targets]
            names = sorted(self._cache)
            payload = {"hashes": sorted(targets), "shards": names,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid()}
            atomic_write_json(self.path / JOURNAL, payload)
            fsync_dir(self.path)  # the journal is durable before any shard is touched
            self._finish_removal()
            return removed

    def _finish_removal(self) -> None:
        """Carry out the removal journal, if any: merge what remains of its shards, delete them, delete it."""
        journal = self._read_journal()
        if journal is None:
            return
        gone, names = journal
        present = sorted(n for n in names if (self.shard_dir / n).is_file())
        if present:
            kept, seen = [], set()
            for name in present:
                try:
                    frames = self._read_shard(name)
                except FileNotFoundError:
                    continue
                for atoms in frames:
                    h = atoms.info[FRAME_HASH]
                    if h not in gone and h not in seen:
                        seen.add(h)
                        kept.append(atoms)
            if kept:
                first_ts = int(SHARD_RE.match(present[0]).group(1))  # type: ignore[union-attr]
                write_extxyz_atomic(kept, self.shard_dir / self._new_shard_name(ts=first_ts - 1))
            for name in present:
                try:
                    (self.shard_dir / name).unlink()
                except FileNotFoundError:
                    pass
            fsync_dir(self.shard_dir)
        (self.path / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.path)
        self._refresh()

    def select(self, conditions: Sequence[str]) -> list[int]:
        """Positions of the frames matching every condition ``KEY OP VALUE`` (see ``frame_matches``)."""
        self._refresh()
        parsed = [parse_condition(c) for c in conditions]
        _check_keys(parsed, self._frames)
        return [i for i, atoms in enumerate(self._frames) if all(frame_matches(atoms, c) for c in parsed)]

    def export_extxyz(self, path: str | os.PathLike) -> int:
        """Write all frames to one extxyz file (atomically) for mace-torch; return the frame count."""
        self._refresh()
        return write_extxyz_atomic(self._frames, path)

    def summary(self) -> dict[str, Any]:
        """``summary`` of the stored frames."""
        self._refresh()
        return summary(self._frames)


_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
        "<": operator.lt, ">": operator.gt}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")
COMPUTED_KEYS = {
    "max_force": "largest |F| of a frame (eV/Å)",
    "energy": "REF_energy (eV)",
    "energy_per_atom": "REF_energy / atoms (eV/atom)",
    "n_atoms": "number of atoms",
    "formula": "chemical formula, e.g. Cu32",
    "hash": "content hash (= matches a prefix)",
}


def parse_condition(text: str) -> tuple[str, str, str]:
    """``"max_force>50"`` -> ``("max_force", ">", "50")``; InputError naming the text otherwise."""
    m = _CONDITION.match(text)
    if not m or not m.group(3):
        raise InputError(f"--where {text!r}: expected KEY OP VALUE with OP one of {' '.join(_OPS)}, "
                         f"e.g. 'max_force>50' or 'source=md'")
    return m.group(1), m.group(2), m.group(3)


def _frame_value(atoms: Atoms, key: str) -> Any:
    if key == "max_force":
        forces = atoms.arrays.get(REF_FORCES)
        return None if forces is None or not len(atoms) else float(np.sqrt((np.asarray(forces) ** 2).sum(1)).max())
    if key == "energy":
        return atoms.info.get(REF_ENERGY)
    if key == "energy_per_atom":
        return None if REF_ENERGY not in atoms.info else float(atoms.info[REF_ENERGY]) / len(atoms)
    if key == "n_atoms":
        return len(atoms)
    if key == "formula":
        return atoms.get_chemical_formula(mode="hill")
    if key == "hash":
        return atoms.info.get(FRAME_HASH, frame_hash(atoms))
    return atoms.info.get(key)


def frame_matches(atoms: Atoms, condition: tuple[str, str, str]) -> bool:
    """Whether ``atoms`` meets ``(key, op, value)``: numbers compare as numbers, anything else as text.

    Keys: ``COMPUTED_KEYS`` or any ``info`` key; a frame without the key never matches.
    ``hash=PREFIX`` matches a hash prefix.
    """
    key, op, text = condition
    value = _frame_value(atoms, key)
    if value is None:
        return False
    if key == "hash" and op in ("=", "=="):
        return str(value).startswith(text.lower())
    try:
        left, right = float(value), float(text)
    except (TypeError, ValueError):
        if op not in ("=", "==", "!="):
            return False
        left, right = str(value), text
    return bool(_OPS[op](left, right))


def _check_keys(conditions: Sequence[tuple[str, str, str]], frames: Sequence[Atoms]) -> None:
    known = set(COMPUTED_KEYS) | {k for a in frames for k in a.info}
    for key, _op, _value in conditions:
        if key not in known:
            raise InputError(f"--where: no frame has {key!r}; expected one of {', '.join(sorted(known))}")


def split(
    frames_or_n: Sequence[Atoms] | int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (train, valid, test) index arrays (each sorted) covering every frame exactly once.

    Reproducible by ``seed`` given the frame order. With n >= 2 and a non-zero
    validation fraction there is at least one validation frame; train keeps at least one.
    """
    n = frames_or_n if isinstance(frames_or_n, (int, np.integer)) else len(frames_or_n)
    if n <= 0:
        raise DatasetError("cannot split an empty dataset (0 frames)")
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    n_valid = int(np.floor(fr[1] * n + 0.5))
    if n >= 2 and fr[1] > 0:
        n_valid = max(1, n_valid)
    n_valid = min(n_valid, n - 1)
    n_test = min(int(np.floor(fr[2] * n + 0.5)), n - 1 - n_valid)
    perm = np.random.default_rng(seed).permutation(n)
    valid = np.sort(perm[:n_valid])
    test = np.sort(perm[n_valid : n_valid + n_test])
    train = np.sort(perm[n_valid + n_test :])
    return train, valid, test


def stable_split(
    frames: Sequence[Atoms], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) index arrays where each frame's part depends on its content only.

    Frame k gets u_k in [0, 1) from the hash of its content (``alflow.io.frame_hash``) and
    ``seed``: valid if u_k < f_valid, test if u_k < f_valid + f_test, else train. A frame
    therefore stays in its part while the dataset grows (the active-learning loop retrains
    on a growing dataset with warm starts: a frame the previous model trained on must not
    become a validation frame, or early stopping would favour the old weights). The parts'
    sizes follow the fractions on average; with n >= 2 and f_valid > 0 the frame of smallest
    u is validation when no u fell below f_valid, and train keeps at least one frame.
    """
    import hashlib

    from alflow.io import frame_hash

    n = len(frames)
    if n <= 0:
        raise DatasetError("cannot split an empty dataset (0 frames)")
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{frame_hash(a)}".encode()).digest()[:8], "little") / 2**64
                  for a in frames])
    part = np.where(u < fr[1], 1, np.where(u < fr[1] + fr[2], 2, 0))
    if n >= 2 and fr[1] > 0 and not np.any(part == 1):
        part[int(np.argmin(u))] = 1
    if not np.any(part == 0):
        part[int(np.argmax(np.where(part == 1, -1.0, u)))] = 0  # the largest-u frame that is not the last valid one
    return tuple(np.flatnonzero(part == p) for p in (0, 1, 2))  # type: ignore[return-value]


def fit_e0(frames: Sequence[Atoms]) -> dict[int, float]:
    """Per-element reference energies e_Z (eV) by least squares: E ≈ Σ_Z n_Z e_Z.

    Warns when the compositions do not determine every e_Z (minimum-norm solution then).
    """
    if not frames:
        raise DatasetError("cannot fit E0 on 0 frames")
    zs = sorted({int(z) for a in frames for z in a.numbers})
    col = {z: j for j, z in enumerate(zs)}
    A = np.zeros((len(frames), len(zs)))
    b = np.zeros(len(frames))
    for i, atoms in enumerate(frames):
        if REF_ENERGY not in atoms.info:
            raise DatasetError(f"frame {i}: missing info['{REF_ENERGY}'] (eV), needed to fit E0")
        for z, count in Counter(int(z) for z in atoms.numbers).items():
            A[i, col[z]] = count
        b[i] = float(atoms.info[REF_ENERGY])
    sol, _res, rank, _sv = np.linalg.lstsq(A, b, rcond=None)
    if rank < len(zs):
        warnings.warn(
            f"compositions determine only {rank} of {len(zs)} element energies; returning the minimum-norm fit",
            stacklevel=2,
        )
    return {z: float(sol[col[z]]) for z in zs}


def summary(frames: Sequence[Atoms]) -> dict[str, Any]:
    """Counts and label ranges: compositions (reduced formula -> frames), atoms per frame,
    elements, energy per atom (eV/atom) min/max, max |force| (eV/Å), frames with stress."""
    sizes = [len(a) for a in frames]
    labelled = [a for a in frames if REF_ENERGY in a.info and len(a)]
    e_per_atom = [float(a.info[REF_ENERGY]) / len(a) for a in labelled]
    with_forces = [a for a in frames if REF_FORCES in a.arrays and len(a)]
    fmax = [float(np.max(np.linalg.norm(a.arrays[REF_FORCES], axis=1))) for a in with_forces]
    comps = Counter(a.get_chemical_formula(mode="metal", empirical=True) for a in frames)
    zs = sorted({int(z) for a in frames for z in a.numbers})
    return {
        "n_frames": len(frames),
        "n_atoms_total": int(sum(sizes)),
        "n_atoms_min": min(sizes) if sizes else None,
        "n_atoms_max": max(sizes) if sizes else None,
        "elements": [chemical_symbols[z] for z in zs],
        "compositions": dict(sorted(comps.items(), key=lambda kv: (-kv[1], kv[0]))),
        "n_labelled": len(labelled),
        "energy_per_atom_min": min(e_per_atom) if e_per_atom else None,
        "energy_per_atom_max": max(e_per_atom) if e_per_atom else None,
        "max_abs_force": max(fmax) if fmax else None,
        "n_with_stress": sum(REF_STRESS in a.info for a in frames),
    }


def format_summary(s: dict[str, Any], title: str | None = None) -> str:
    """Text rendering of ``summary``."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [title] if title else []
    lines += [
        f"frames            {s['n_frames']} ({s['n_labelled']} labelled, {s['n_with_stress']} with stress)",
        f"atoms per frame   {s['n_atoms_min'] if s['n_atoms_min'] is not None else '-'}"
        f"..{s['n_atoms_max'] if s['n_atoms_max'] is not None else '-'} ({s['n_atoms_total']} in all)",
        f"elements          {' '.join(s['elements']) or '-'}",
        f"energy/atom (eV)  {num(s['energy_per_atom_min'], '.6f')} .. {num(s['energy_per_atom_max'], '.6f')}",
        f"max |F| (eV/Å)    {num(s['max_abs_force'], '.4f')}",
        "compositions:",
    ]
    lines += [f"  {formula:<16} {count}" for formula, count in s["compositions"].items()] or ["  -"]
    return "\n".join(lines)
