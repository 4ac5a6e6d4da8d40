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

Units: energies eV, forces eV/Å, stress eV/Å³ (Voigt xx yy zz yz xz xy, ASE sign).
"""

from __future__ import annotations

import os
import re
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

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
from alflow.keys import FRAME_HASH, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE

__all__ = [
    "Dataset",
    "DatasetError",
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

    def _refresh(self) -> None:
        """Sync the in-memory view with shards on disk (other writers, compactions)."""
        changed = False
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
        self._frames, self._hashes = [], set()
        for name in sorted(self._cache):
            for atoms in self._cache[name]:
                h = atoms.info[FRAME_HASH]
                if h not in self._hashes:
                    self._hashes.add(h)
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

    def _add(self, frames: Iterable[Atoms] | Atoms, wheres: Sequence[str], provenance: dict[str, Any]) -> int:
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
        new, seen = [], set(self._hashes)
        for atoms in prepared:
            if atoms.info[FRAME_HASH] not in seen:
                seen.add(atoms.info[FRAME_HASH])
                new.append(atoms)
        if new:
            name = self._new_shard_name()
            write_extxyz_atomic(new, self.shard_dir / name)
            self._cache[name] = new
            self._rebuild()
        self._clean_stale_tmp()
        return len(new)

    def append(self, frames: Iterable[Atoms] | Atoms, source: str | None = None) -> int:
        """Validate then store ``frames`` (one shard); return how many were new.

        ``source`` fills ``info[SOURCE]`` where a frame has none. Any invalid frame
        rejects the whole batch (DatasetError) before anything is written.
        """
        batch = [frames] if isinstance(frames, Atoms) else list(frames)
        wheres = [f"frame {i} of the batch appended to {self.path}" for i in range(len(batch))]
        return self._add(batch, wheres, {} if source is None else {SOURCE: source})

    def import_file(self, path: str | os.PathLike, **provenance: Any) -> int:
        """Import labelled frames from any file ``read_frames`` reads; return how many were new.

        ``provenance`` (e.g. ``source="vasp"``, ``labeller="pbe"``) fills info keys a
        frame lacks; ``source`` defaults to ``"file"``. Unlabelled frames are an error.
        """
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
        an interruption leaves duplicates that readers drop.
        """
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

    def export_extxyz(self, path: str | os.PathLike) -> int:
        """Write all frames to one extxyz file (atomically) for mace-torch; return the frame count."""
        self._refresh()
        return write_extxyz_atomic(self._frames, path)

    def summary(self) -> dict[str, Any]:
        """``summary`` of the stored frames."""
        self._refresh()
        return summary(self._frames)


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
