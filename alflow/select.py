"""Selection: which explored frames are worth a reference (DFT) calculation.

Input: scored frames from any number of walkers (``info[MAX_FORCE_DEVIATION]``
eV/Å, ``info[ENERGY_DEVIATION_PER_ATOM]`` eV/atom, provenance ``walker``,
``step``, ``iteration``) and the current dataset. Output (``Selection``): the
frames to label, each with ``info["selection_reason"]``, the frames rejected
before labelling with ``info["rejection_reason"]``, and a summary dict.

Strategy "committee" (SelectionConfig), in this order:

1. Trust window (DP-GEN, Zhang et al., Comput. Phys. Commun. 253, 107206 (2020)):
   per criterion (force: ``lower``/``upper``; energy: ``energy_lower``/``energy_upper``
   when set) a frame is accurate (dev < lower), candidate (lower <= dev < upper)
   or failed (dev >= upper, or NaN). Failed by any criterion -> failed (never
   selected: keeps exploded frames out); candidate by any -> candidate.
2. Adaptive lower level (``adaptive_fraction``): when fewer frames are candidates
   than the budget, the pool is topped up with the most uncertain accurate frames
   until it holds ``ceil(adaptive_fraction * n)`` of the n non-failed frames (or
   every candidate, if more): a fixed label budget keeps buying the frames the
   committee is least sure of instead of stopping at the trust level.
3. Frames already in the dataset (same content hash) are dropped; physical
   filters reject (with the reason): minimum interatomic distance
   (max of ``min_interatomic_distance`` and ``covalent_fraction`` x the sum of
   the two covalent radii), predicted max |F| (committee mean forces in
   ``arrays`` or calculator results, when present) above ``max_force``, cell
   sanity for 3D-periodic frames (volume per atom in ``volume_per_atom`` Å³,
   every cell angle within ``cell_angles`` degrees).
4. Diversity ``fps``: candidates within ``dataset_distance`` of a dataset frame
   in descriptor space are dropped, then farthest-point sampling (the dataset
   counts as already chosen; with an empty dataset the most uncertain
   candidate comes first), among the ``ceil(fps_pool * budget)`` most uncertain
   candidates when ``fps_pool`` is set. ``none``: top-k by uncertainty score
   max(dev_F / lower, dev_E / energy_lower).
5. Caps on every pick: ``max_per_iteration`` in all (or ``budget``),
   ``max_per_walker`` per walker, and ``min_stride``: selected frames of one
   walker are at least this many MD steps apart (``info["step"]``, else the
   frame's index in its trajectory).

Strategy "random" (baseline): a seeded uniform draw, ignoring the scores, among
frames that pass the filters and are not in the dataset, with the same caps
and budget.

Descriptor (``structure_descriptors``): for each atom i of species a and each
neighbour species b, Gaussian radial features g_k = sum_j exp(-(d_ij - r_k)^2 /
2 sigma^2) fc(d_ij), r_k on ``DESCRIPTOR_GRID`` (0.5..cutoff Å), cosine cutoff fc;
the structure vector holds the mean and the standard deviation over the atoms
of species a, for every (a, b), divided by sqrt(dimension) so distances are an
RMS difference of per-atom neighbour counts. Invariant to rotation,
translation, permutation and supercell repetition; cheap (one neighbour list).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols, covalent_radii

from alflow.config import SelectionConfig
from alflow.io import frame_hash
from alflow.keys import (ENERGY_DEVIATION_PER_ATOM, FRAME_HASH, MAX_FORCE_DEVIATION, PRED_FORCES, REJECTION_REASON,
                         SELECTION_REASON, STEP, WALKER)
from alflow.neighbors import neighbor_list

__all__ = ["Selection", "select_frames", "structure_descriptors", "physical_rejection", "load_scored", "classify"]

SELECTION_SCORE = "selection_score"
PREDICTED_FORCES_KEYS = (PRED_FORCES, "committee_mean_forces", "mean_forces", "forces")  # arrays keys, first found wins
DESCRIPTOR_CUTOFF = 5.0  # Å
DESCRIPTOR_GRID = np.linspace(0.5, DESCRIPTOR_CUTOFF, 19)  # Å, Gaussian centres
DESCRIPTOR_SIGMA = 0.25  # Å
ACCURATE, CANDIDATE, FAILED = "accurate", "candidate", "failed"


@dataclass(frozen=True)
class Selection:
    """Frames to label (copies, ``info[selection_reason]``), rejected frames (``info[rejection_reason]``), summary."""

    frames: list[Atoms]
    rejected: list[Atoms]
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- input
def load_scored(paths: Sequence[str | os.PathLike]) -> list[list[Atoms]]:
    """Read extxyz trajectories (one per walker) keeping predicted forces as calculator results."""
    out = []
    for p in paths:
        got = ase.io.read(p, index=":")
        out.append([got] if isinstance(got, Atoms) else list(got))
    return out


def _flatten(trajectories: Any) -> list[tuple[Atoms, str, int]]:
    """(frame, walker id, step) for a flat list, a list of trajectories, paths, or {walker: trajectory}."""
    if isinstance(trajectories, Atoms):
        trajectories = [trajectories]
    if isinstance(trajectories, Mapping):
        groups = [(str(k), list(v)) for k, v in trajectories.items()]
    else:
        items = list(trajectories)
        if items and all(isinstance(t, (str, os.PathLike)) for t in items):
            groups = [(Path(p).stem, t) for p, t in zip(items, load_scored(items))]
        elif all(isinstance(t, Atoms) for t in items):
            groups = [(None, items)]
        else:
            groups = [(str(k), list(t)) for k, t in enumerate(items)]
    out = []
    for default_walker, traj in groups:
        for idx, atoms in enumerate(traj):
            if not isinstance(atoms, Atoms):
                raise TypeError(f"trajectories: expected ase.Atoms frames, got {type(atoms).__name__}")
            walker = atoms.info.get(WALKER, default_walker if default_walker is not None else 0)
            out.append((atoms, str(walker), int(atoms.info.get(STEP, idx))))
    return out


def _deviation(atoms: Atoms, key: str, where: str) -> float:
    if key not in atoms.info:
        raise ValueError(f"{where}: missing info['{key}'] (committee score); score the frames first")
    value = float(atoms.info[key])
    return value if math.isfinite(value) else math.inf  # NaN/inf deviation: failed


def classify(atoms: Atoms, cfg: SelectionConfig, where: str = "frame") -> tuple[str, float, str]:
    """Trust-window class (accurate/candidate/failed), uncertainty score and the deviations as text."""
    f = _deviation(atoms, MAX_FORCE_DEVIATION, where)
    classes = [ACCURATE if f < cfg.lower else CANDIDATE if f < cfg.upper else FAILED]
    score = f / cfg.lower
    text = f"{MAX_FORCE_DEVIATION}={f:.4g} eV/Å (window [{cfg.lower:g}, {cfg.upper:g}))"
    if cfg.energy_lower is not None or cfg.energy_upper is not None:
        e = _deviation(atoms, ENERGY_DEVIATION_PER_ATOM, where)
        lo = cfg.energy_lower if cfg.energy_lower is not None else math.inf
        hi = cfg.energy_upper if cfg.energy_upper is not None else math.inf
        classes.append(ACCURATE if e < lo else CANDIDATE if e < hi else FAILED)
        if cfg.energy_lower is not None:
            score = max(score, e / cfg.energy_lower if cfg.energy_lower > 0 else math.inf)
        text += f", {ENERGY_DEVIATION_PER_ATOM}={e:.4g} eV/atom (window [{cfg.energy_lower}, {cfg.energy_upper}))"
    cls = FAILED if FAILED in classes else CANDIDATE if CANDIDATE in classes else ACCURATE
    return cls, score, text


# ----------------------------------------------------------------------------------- filters
def _predicted_forces(atoms: Atoms) -> np.ndarray | None:
    for key in PREDICTED_FORCES_KEYS:
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], dtype=float)
    results = getattr(atoms.calc, "results", None) or {}
    return None if results.get("forces") is None else np.asarray(results["forces"], dtype=float)


def _cell_angles(cell: np.ndarray) -> np.ndarray:
    a, b, c = cell
    def ang(u: np.ndarray, v: np.ndarray) -> float:
        return math.degrees(math.acos(float(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))
    return np.array([ang(b, c), ang(a, c), ang(a, b)])


def physical_rejection(
    atoms: Atoms,
    cfg: SelectionConfig,
) -> str | None:
    """Why ``atoms`` must not be sent to the oracle, or None when it passes the physical filters
    (levels: ``cfg.volume_per_atom``, ``cfg.cell_angles``, ``cfg.covalent_fraction``, ...).

    A pair is too close below max(``min_interatomic_distance``, ``covalent_fraction`` x
    (r_cov,i + r_cov,j)) (ASE covalent radii; e.g. Si-Si 1.11 Å, Cu-Cu 1.32 Å, H-H 0.31 Å at 0.5).
    """
    volume_per_atom, cell_angles, covalent_fraction = cfg.volume_per_atom, cfg.cell_angles, cfg.covalent_fraction
    if not np.all(np.isfinite(atoms.positions)) or not np.all(np.isfinite(np.asarray(atoms.cell))):
        return "non_finite: positions or cell contain NaN/inf"
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell, dtype=float)
    if pbc.all():
        volume = abs(float(np.linalg.det(cell)))
        v = volume / len(atoms)
        if not volume_per_atom[0] <= v <= volume_per_atom[1]:
            return f"cell_volume: {v:.3g} Å³/atom outside [{volume_per_atom[0]:g}, {volume_per_atom[1]:g}]"
        angles = _cell_angles(cell)
        if np.any(angles < cell_angles[0]) or np.any(angles > cell_angles[1]):
            return f"cell_angles: {np.round(angles, 1).tolist()} deg outside [{cell_angles[0]:g}, {cell_angles[1]:g}]"
    radii = covalent_radii[atoms.numbers] * covalent_fraction
    reach = max(cfg.min_interatomic_distance, 2.0 * float(radii.max()))
    try:
        nl = neighbor_list(atoms.positions, cell, pbc, reach)
    except ValueError as err:
        return f"cell: {err}"
    if len(nl):
        limit = np.maximum(cfg.min_interatomic_distance, radii[nl.i] + radii[nl.j])
        bad = np.flatnonzero(nl.d < limit)
        if len(bad):
            k = int(bad[np.argmin(nl.d[bad] / limit[bad])])
            return (f"min_distance: {float(nl.d[k]):.3f} Å between atoms {int(nl.i[k])} and {int(nl.j[k])} "
                    f"< {float(limit[k]):.3g} Å (max of {cfg.min_interatomic_distance:g} Å and "
                    f"{covalent_fraction:g} x the covalent radii sum)")
    forces = _predicted_forces(atoms)
    if forces is not None and forces.shape == (len(atoms), 3):
        fmax = float(np.max(np.linalg.norm(forces, axis=1))) if np.all(np.isfinite(forces)) else math.inf
        if fmax > cfg.max_force:
            return f"max_force: predicted max |F| {fmax:.3g} eV/Å > {cfg.max_force:g} eV/Å"
    return None


# -------------------------------------------------------------------------------- descriptors
def _cosine_cutoff(d: np.ndarray, rc: float) -> np.ndarray:
    return np.where(d < rc, 0.5 * (np.cos(np.pi * d / rc) + 1.0), 0.0)


def structure_descriptors(
    frames: Sequence[Atoms], species: Sequence[int] | None = None, cutoff: float = DESCRIPTOR_CUTOFF
) -> np.ndarray:
    """(n_frames, 2 * S^2 * K) descriptors (mean and std over atoms of per-atom radial features; module docstring)."""
    zs = sorted({int(z) for a in frames for z in a.numbers}) if species is None else [int(z) for z in species]
    col = {z: k for k, z in enumerate(zs)}
    n_s, grid = len(zs), DESCRIPTOR_GRID[DESCRIPTOR_GRID < cutoff]
    out = np.zeros((len(frames), 2, n_s, n_s, len(grid)))
    for f, atoms in enumerate(frames):
        spec = np.array([col[int(z)] for z in atoms.numbers])
        nl = neighbor_list(atoms.positions, np.asarray(atoms.cell), atoms.pbc, cutoff)
        g = np.exp(-((nl.d[:, None] - grid[None]) ** 2) / (2 * DESCRIPTOR_SIGMA**2)) * _cosine_cutoff(nl.d, cutoff)[:, None]
        per_atom = np.zeros((len(atoms), n_s, len(grid)))
        np.add.at(per_atom, (nl.i, spec[nl.j]), g)
        for a in range(n_s):
            mask = spec == a
            if mask.any():
                out[f, 0, a] = per_atom[mask].mean(axis=0)
                out[f, 1, a] = per_atom[mask].std(axis=0)
    flat = out.reshape(len(frames), -1)
    return flat / math.sqrt(max(flat.shape[1], 1))


def _pairwise_min(x: np.ndarray, y: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each row of x, the smallest Euclidean distance to a row of y (inf when y is empty)."""
    if len(y) == 0:
        return np.full(len(x), math.inf)
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        d2 = ((x[s : s + chunk, None, :] - y[None]) ** 2).sum(-1)
        out[s : s + chunk] = np.sqrt(d2.min(axis=1))
    return out


# --------------------------------------------------------------------------------- selection
class _Caps:
    """max_per_walker and min_stride bookkeeping."""

    def __init__(self, cfg: SelectionConfig, budget: int):
        self.cfg, self.budget = cfg, budget
        self.per_walker: Counter[str] = Counter()
        self.steps: dict[str, list[int]] = {}
        self.n = 0

    def allows(self, walker: str, step: int) -> bool:
        if self.n >= self.budget:
            return False
        if self.cfg.max_per_walker is not None and self.per_walker[walker] >= self.cfg.max_per_walker:
            return False
        return all(abs(step - s) >= self.cfg.min_stride for s in self.steps.get(walker, ()))

    def take(self, walker: str, step: int) -> None:
        self.n += 1
        self.per_walker[walker] += 1
        self.steps.setdefault(walker, []).append(step)


def _dataset_view(dataset: Any, need_frames: bool) -> tuple[frozenset[str], list[Atoms]]:
    """Content hashes of the dataset, and its frames when the descriptors need them."""
    if dataset is None:
        return frozenset(), []
    if hasattr(dataset, "hashes") and hasattr(dataset, "frames"):
        return dataset.hashes, dataset.frames() if need_frames else []
    if isinstance(dataset, (set, frozenset)):  # content hashes only: no near-dataset exclusion
        return frozenset(dataset), []
    frames = list(dataset)
    return frozenset(a.info.get(FRAME_HASH) or frame_hash(a) for a in frames), frames


def select_frames(
    trajectories: Any,
    config: SelectionConfig | None = None,
    dataset: Any = None,
    *,
    seed: int = 0,
    budget: int | None = None,
) -> Selection:
    """Choose frames to label (module docstring). ``dataset``: a ``Dataset``, a list of frames, a set of
    content hashes (``Dataset.hashes``; exact duplicates only), or None.

    ``budget`` overrides ``config.max_per_iteration`` (e.g. give the random
    baseline the number the committee strategy selected).
    """
    cfg = config or SelectionConfig()
    dataset_distance = cfg.dataset_distance
    budget = cfg.max_per_iteration if budget is None else int(budget)
    items = _flatten(trajectories)
    ds_hashes, ds_frames = _dataset_view(dataset, cfg.strategy == "committee" and cfg.diversity == "fps")
    walkers = list(dict.fromkeys(w for _, w, _ in items))
    per_walker = {w: Counter() for w in walkers}
    rejections: Counter[str] = Counter()
    rejected: list[Atoms] = []

    def reject(k: int, reason: str) -> None:
        atoms = items[k][0].copy()
        atoms.info[REJECTION_REASON] = reason
        rejected.append(atoms)
        rejections[reason.split(":")[0]] += 1

    classes, scores, texts = [], np.zeros(len(items)), []
    keys = [MAX_FORCE_DEVIATION] + ([ENERGY_DEVIATION_PER_ATOM] if cfg.energy_lower or cfg.energy_upper else [])
    scored = cfg.strategy == "committee" or all(k in a.info for a, _, _ in items for k in keys)
    if scored:  # the random baseline ignores scores; they only feed its summary
        for k, (atoms, w, step) in enumerate(items):
            cls, scores[k], text = classify(atoms, cfg, f"walker {w}, step {step}")
            classes.append(cls)
            texts.append(text)
            per_walker[w][cls] += 1
    adaptive_from: set[int] = set()  # pool members that are there by the adaptive top-up
    if cfg.strategy == "committee":
        pool = [k for k, c in enumerate(classes) if c == CANDIDATE]
        if len(pool) < budget and cfg.adaptive_fraction is not None:
            # top up: the most uncertain accurate frames join the (too few) candidates
            accurate = [k for k, c in enumerate(classes) if c == ACCURATE]
            n_take = math.ceil(cfg.adaptive_fraction * (len(accurate) + len(pool)))
            extra = sorted(accurate, key=lambda k: -scores[k])[:max(0, n_take - len(pool))]
            adaptive_from = set(extra)
            pool = pool + extra
    else:
        pool = list(range(len(items)))
    adaptive = bool(adaptive_from)

    kept, seen = [], set(ds_hashes)
    n_duplicate = 0
    for k in pool:
        h = frame_hash(items[k][0])
        if h in seen:
            n_duplicate += 1
            continue
        seen.add(h)
        why = physical_rejection(items[k][0], cfg)
        if why is not None:
            per_walker[items[k][1]]["filtered"] += 1
            reject(k, why)
            continue
        kept.append(k)
    n_filtered = len(rejected)

    caps = _Caps(cfg, budget)
    chosen: list[int] = []
    how: dict[int, str] = {}
    if cfg.strategy == "random":
        rng = np.random.default_rng(seed)
        for k in [kept[i] for i in rng.permutation(len(kept))]:
            if caps.allows(items[k][1], items[k][2]):
                caps.take(items[k][1], items[k][2])
                chosen.append(k)
                how[k] = f"random: uniform baseline draw (seed {seed}, budget {budget})"
    elif cfg.diversity == "fps" and kept:
        species = sorted({int(z) for k in kept for z in items[k][0].numbers} | {int(z) for a in ds_frames for z in a.numbers})
        x = structure_descriptors([items[k][0] for k in kept], species)
        y = structure_descriptors(ds_frames, species) if ds_frames else np.zeros((0, x.shape[1]))
        mind = _pairwise_min(x, y)
        near = mind < dataset_distance
        for idx in np.flatnonzero(near):
            per_walker[items[kept[idx]][1]]["near_dataset"] += 1
            reject(kept[idx], f"near_dataset: descriptor distance {mind[idx]:.3g} < {dataset_distance:g} to a dataset frame")
        alive = ~near
        sc = np.array([scores[k] for k in kept])
        if cfg.fps_pool is not None:  # only the most uncertain candidates compete on distance
            order = np.argsort(-np.where(alive, sc, -np.inf), kind="stable")
            alive[order[math.ceil(cfg.fps_pool * budget):]] = False
        while alive.any():
            elig = np.array([alive[i] and caps.allows(items[kept[i]][1], items[kept[i]][2]) for i in range(len(kept))])
            if not elig.any():
                break
            key = np.where(elig, mind, -np.inf) if np.isfinite(mind[elig]).any() else np.where(elig, sc, -np.inf)
            best = np.flatnonzero(key == key.max())
            i = int(best[np.argmax(sc[best])])
            k = kept[i]
            caps.take(items[k][1], items[k][2])
            chosen.append(k)
            how[k] = f"fps pick {len(chosen)} (descriptor distance to dataset/selected {mind[i]:.3g})"
            alive[i] = False
            mind = np.minimum(mind, np.sqrt(((x - x[i]) ** 2).sum(-1)))
    else:
        for rank, k in enumerate(sorted(kept, key=lambda k: -scores[k])):
            if caps.allows(items[k][1], items[k][2]):
                caps.take(items[k][1], items[k][2])
                chosen.append(k)
                how[k] = f"top-k rank {rank + 1} by uncertainty"

    frames = []
    for k in chosen:
        atoms, w, step = items[k]
        out = atoms.copy()
        out.calc = None
        for key in PREDICTED_FORCES_KEYS:  # predictions must never be read back as labels
            if key in out.arrays:
                del out.arrays[key]
        if cfg.strategy == "committee":
            head = ("adaptive: fewer candidates than the budget, among the most uncertain non-failed frames"
                    if k in adaptive_from else "candidate")
            out.info[SELECTION_REASON] = f"{head}; {texts[k]}; {how[k]}"
            out.info[SELECTION_SCORE] = float(scores[k])
        else:
            out.info[SELECTION_REASON] = how[k]
        out.info.setdefault(WALKER, w)
        out.info.setdefault(STEP, step)
        per_walker[w]["selected"] += 1
        frames.append(out)

    count = Counter(classes)
    summary = {
        "strategy": cfg.strategy,
        "n_frames": len(items),
        "n_accurate": count[ACCURATE],
        "n_candidate": count[CANDIDATE],
        "n_failed": count[FAILED],
        "adaptive": adaptive,
        "n_pool": len(pool),
        "n_duplicate": n_duplicate,
        "n_filtered": n_filtered,
        "n_near_dataset": len(rejected) - n_filtered,
        "n_selected": len(frames),
        "budget": budget,
        "rejections": dict(rejections),
        "per_walker": {w: {key: int(per_walker[w][key]) for key in
                           (ACCURATE, CANDIDATE, FAILED, "filtered", "near_dataset", "selected")} for w in walkers},
        "elements": sorted({chemical_symbols[int(z)] for a, _, _ in items for z in a.numbers}),
    }
    if cfg.strategy == "random":
        summary["seed"] = seed
    return Selection(frames=frames, rejected=rejected, summary=summary)
