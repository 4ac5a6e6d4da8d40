"""The batched exploration engine: every walker as one set of tensors on one device.

:func:`run_batched` runs the same :class:`~alflow.explore.ase_md.WalkerSpec` s as the ASE engine
and writes the same scored frames and :class:`~alflow.explore.frames.WalkerResult` s (through
:mod:`alflow.explore.frames`), but positions, momenta, cells and thermostat/barostat state of all
walkers live in one :class:`~alflow.md.state.MDState` and every MD step is one call of the
committee for all of them (:mod:`alflow.md.integrators`).

- **No stalls**: the stop rules run on the device each step (patience counter, non-finite or huge
  forces, atoms closer than ``min_distance``); a walker that stops is frozen there (its time step
  set to 0) and the host reads the device only at steps where some walker has a frame to write.
- **Walkers leave and join**: a walker that is DONE, UNCERTAIN, EXPLODED or ERROR leaves the batch
  at the next host look; waiting walkers fill the freed room. A walker's random numbers depend
  only on its own seed and step, so the others' trajectories do not change.
- **Autobatching**: at most ``max_atoms`` atoms in the batch; by default all walkers on the CPU,
  and on CUDA a budget from free memory and the memory one model call takes per atom.
- **Neighbor list**: ``alflow.neighbors.SkinNeighborList`` (Verlet skin) when available, else a
  list rebuilt every step; pairs beyond the model's cutoff are dropped before the model call.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from alflow import keys
from alflow.ensembles import for_engine as ensembles_for
from alflow.explore.ase_md import WalkerSpec, check_finite_settings, committee_alpha, ramp
from alflow.explore.evaluator import skips_spread
from alflow.devices import resolve_device as pick_device
from alflow.explore.frames import (
    DONE,
    ERROR,
    EXPLODED,
    MAX_FORCE,
    UNCERTAIN,
    Trajectory,
    WalkerResult,
    exploded_message,
    scored_frame,
    uncertain_message,
    write_results,
)
from alflow.md import integrators
from alflow.md.state import MDState, WalkerSetup, concat, make_state, select
from alflow.neighbors import batch_neighbor_list, edge_vectors

ENSEMBLES = ensembles_for("batched")  # the one ensemble table: alflow.ensembles
RUNNING, STOP_UNCERTAIN, STOP_NONFINITE, STOP_FORCE, STOP_CLOSE = 0, 1, 2, 3, 4


class RebuildNeighborList:
    """The ``SkinNeighborList`` interface without a skin: rebuilt every call (``alflow.neighbors``, exact cutoff)."""

    def __init__(self, cutoff: float, skin: float = 0.0) -> None:
        self.cutoff = float(cutoff)
        self.skin = 0.0
        self.rebuilds = 0

    def reset(self) -> None:
        pass

    def __call__(self, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor,
                 batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(batch, minlength=cells.shape[0])
        nl = batch_neighbor_list(positions.detach(), cells.detach(), pbc.cpu().numpy(), counts.cpu(), self.cutoff)
        self.rebuilds += 1
        return torch.stack([nl.i, nl.j]), nl.S.to(positions.dtype)


def neighbor_list(cutoff: float, skin: float) -> Any:
    """``SkinNeighborList(cutoff, skin)`` when ``alflow.neighbors`` has it and skin > 0, else a per-step rebuild."""
    if skin > 0:
        try:
            from alflow.neighbors import SkinNeighborList  # type: ignore[attr-defined]
        except ImportError:
            SkinNeighborList = None  # noqa: N806
        if SkinNeighborList is not None:
            return SkinNeighborList(cutoff, skin=skin)
    return RebuildNeighborList(cutoff)


class ForceCall:
    """``state -> state`` with the provider's energy, forces, stress and committee scores (all walkers, one call).

    Non-finite positions are replaced before the neighbor list; a walker whose positions, energy or
    forces are not finite gets ``max_abs_force = inf`` and zero forces (it is stopped as EXPLODED).
    """

    def __init__(self, model: Any, skin: float, stress: bool) -> None:
        self.model = model
        self.cutoff = float(model.cutoff)
        self.nl = neighbor_list(self.cutoff, skin)
        self.stress = stress
        self.model_dtype = _model_dtype(model)
        self.calls = 0
        # a provider that can skip its committee spread (a shallow committee's K backward passes) is asked
        # for it only when ``want_spread`` (the engine sets it for steps that record a frame)
        self.sparse = skips_spread(model)
        self.want_spread = True

    def batch(self, state: MDState) -> dict[str, torch.Tensor]:
        """The model's input batch for ``state`` (pairs within the cutoff); also sets ``self.pair_min``."""
        pos = state.positions
        atom_ok = torch.isfinite(pos).all(-1)
        bad = torch.zeros_like(state.dt).index_add(0, state.batch, (~atom_ok).to(state.dtype)) > 0
        self.bad_positions = bad
        pos = torch.where(atom_ok[:, None], pos, torch.zeros_like(pos))
        edges, shifts = self.nl(pos, state.cells, state.pbc, state.batch)
        i, j = edges[0], edges[1]
        d = torch.linalg.norm(pos.index_select(0, j) - pos.index_select(0, i) + self._shift_vectors(edges, shifts, state),
                              dim=-1)
        if self.nl.skin > 0:
            keep = d <= self.cutoff
            edges, shifts, d, i = edges[:, keep], shifts[keep], d[keep], i[keep]
        inf = torch.full_like(state.dt, math.inf)
        self.pair_min = inf.scatter_reduce(0, state.batch[i], d, reduce="amin", include_self=True)
        dt = self.model_dtype
        return {
            keys.POSITIONS: pos.to(dt),
            keys.NUMBERS: state.numbers,
            keys.CELL: state.cells.to(dt),
            keys.PBC: state.pbc,
            keys.EDGE_INDEX: edges,
            keys.SHIFTS: shifts.to(dt),
            keys.BATCH: state.batch,
            keys.N_ATOMS: state.n_atoms,
        }

    def _shift_vectors(self, edges: torch.Tensor, shifts: torch.Tensor, state: MDState) -> torch.Tensor:
        """S @ cell per pair (E, 3), Å; cached while the pair list and the cells stay the same (NVT: until a rebuild)."""
        cache = getattr(self, "_shift_cache", None)
        if cache is not None and cache[0] is edges and cache[1] is state.cells:
            return cache[2]  # no barostat moved the cells (the engine's states keep the same cells tensor then)
        vectors = edge_vectors(torch.zeros_like(state.positions), state.cells, edges[0], edges[1], shifts, state.batch)
        self._shift_cache = (edges, state.cells, vectors)
        return vectors

    def __call__(self, state: MDState) -> MDState:
        batch = self.batch(state)
        spread = self.want_spread or not self.sparse
        out = self.model(batch, forces=True, stress=self.stress, **({} if spread else {"spread": False}))
        self.calls += 1
        dtype = state.dtype
        energy = out[keys.ENERGY].detach().to(dtype)
        forces = out[keys.FORCES].detach().to(dtype)
        atom_ok = torch.isfinite(forces).all(-1)
        n_bad = torch.zeros_like(state.dt).index_add(0, state.batch, (~atom_ok).to(dtype))
        finite = (n_bad == 0) & torch.isfinite(energy) & ~self.bad_positions
        forces = torch.where(finite[state.batch, None], forces, torch.zeros_like(forces))
        biggest = torch.zeros_like(state.dt).scatter_reduce(0, state.batch, forces.abs().amax(-1), reduce="amax",
                                                             include_self=True)
        zeros_b = torch.zeros_like(state.dt)
        stress = out[keys.STRESS].detach().to(dtype) if self.stress and keys.STRESS in out else state.stress
        return replace(
            state,
            forces=forces,
            energy=energy,
            stress=torch.where(torch.isfinite(stress), stress, torch.zeros_like(stress)),
            max_force_deviation=_get(out, keys.MAX_FORCE_DEVIATION, zeros_b).to(dtype),
            energy_deviation_per_atom=_get(out, keys.ENERGY_DEVIATION_PER_ATOM, zeros_b).to(dtype),
            force_deviation=_get(out, "force_deviation", torch.zeros_like(state.masses)).to(dtype),
            min_distance=self.pair_min,
            max_abs_force=torch.where(finite, biggest, torch.full_like(biggest, math.inf)),
        )


def _get(out: dict[str, Any], key: str, default: torch.Tensor) -> torch.Tensor:
    value = out.get(key)
    return default if value is None else value.detach()


def _model_dtype(model: Any) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return torch.float64


@dataclass
class Monitor:
    """Per-walker stop bookkeeping on the device: code (RUNNING, STOP_*), the step it stopped, patience, worst."""

    code: torch.Tensor
    stop_step: torch.Tensor
    above: torch.Tensor
    worst: torch.Tensor

    @classmethod
    def new(cls, b: int, dtype: torch.dtype, device: torch.device) -> Monitor:
        z = torch.zeros(b, dtype=torch.long, device=device)
        return cls(z, z.clone(), z.clone(), torch.zeros(b, dtype=dtype, device=device))

    def select(self, index: torch.Tensor) -> Monitor:
        return Monitor(self.code[index], self.stop_step[index], self.above[index], self.worst[index])

    def concat(self, other: Monitor) -> Monitor:
        return Monitor(*(torch.cat([a, b]) for a, b in zip((self.code, self.stop_step, self.above, self.worst),
                                                            (other.code, other.stop_step, other.above, other.worst))))


def update_monitor(state: MDState, mon: Monitor, upper: float, patience: int, min_distance: float,
                   max_force: float) -> tuple[MDState, Monitor]:
    """Apply the stop rules to the last force call (on the device); stopped walkers get dt = 0 (frozen)."""
    running = mon.code == RUNNING
    dev = state.max_force_deviation
    code = torch.where(~torch.isfinite(state.max_abs_force), STOP_NONFINITE,
                       torch.where(state.max_abs_force > max_force, STOP_FORCE,
                                   torch.where(state.min_distance < min_distance, STOP_CLOSE, RUNNING)))
    # dev is NaN on steps without a spread (a shallow committee between frames): a run above ``upper`` at the
    # last look counts on, as if it stayed there, until the next look says otherwise
    seen = torch.where(torch.isfinite(dev), (dev > upper).to(mon.above.dtype), (mon.above > 0).to(mon.above.dtype))
    above = torch.where(running & (code == RUNNING), torch.where(seen > 0, mon.above + 1, 0), mon.above)
    code = torch.where((code == RUNNING) & (above >= patience), STOP_UNCERTAIN, code)
    newly = running & (code != RUNNING)
    worst = torch.where(running & torch.isfinite(dev), torch.maximum(mon.worst, dev), mon.worst)
    mon = Monitor(torch.where(newly, code, mon.code), torch.where(newly, state.step, mon.stop_step), above, worst)
    return replace(state, dt=torch.where(newly, torch.zeros_like(state.dt), state.dt)), mon


@dataclass
class _Walker:
    index: int
    spec: WalkerSpec
    trajectory: Trajectory
    started: float
    step: int = 0  # steps done (host copy; equal to the device's while running)


def setup_of(spec: WalkerSpec) -> WalkerSetup:
    """The integrator settings of ``spec`` (thermostat 100 time steps, barostat 1000, as the ASE engine)."""
    if spec.ensemble not in ENSEMBLES:
        raise ValueError(f"{spec.name}: ensemble {spec.ensemble!r} is not supported by the batched engine "
                         f"(supported: {', '.join(ENSEMBLES)})")
    return WalkerSetup(atoms=spec.atoms, ensemble=spec.ensemble, temperature=spec.temperature, pressure=spec.pressure,
                       timestep=spec.timestep, steps=spec.steps, seed=spec.seed, friction=spec.friction,
                       thermalize=getattr(spec, "thermalize", True))


def auto_max_atoms(model: Any, device: torch.device, sample: Sequence[WalkerSpec], fraction: float = 0.6) -> int | None:
    """Atoms per batch that fit in ``fraction`` of the free CUDA memory (None on other devices: no limit).

    Measured, not guessed: one force call on the first walker gives the peak memory per atom.
    """
    if device.type != "cuda" or not sample:
        return None
    spec = sample[0]
    state = make_state([setup_of(spec)], dtype=_model_dtype(model), device=device)
    call = ForceCall(model, 0.0, stress=spec.ensemble.startswith("npt"))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(state)
    torch.cuda.synchronize(device)
    per_atom = max((torch.cuda.max_memory_allocated(device) - base) / max(len(spec.atoms), 1), 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(fraction * free / per_atom), len(spec.atoms))


def run_batched(
    specs: Sequence[WalkerSpec],
    model: Any,
    out_dir: str | Path,
    *,
    upper: float = 0.5,
    patience: int = 20,
    min_distance: float = 0.5,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    max_atoms: int | None = None,
    skin: float = 0.5,
    dtype: torch.dtype | None = None,
    max_force: float = MAX_FORCE,
) -> list[WalkerResult]:
    """Run every walker in one device batch; returns one :class:`WalkerResult` each and writes ``walkers.json``.

    ``model``: a Potential, Committee or force provider (:mod:`alflow.md.providers`). ``max_atoms``:
    the most atoms in the batch at once (default: :func:`auto_max_atoms`). ``skin`` (Å): Verlet skin
    of the neighbor list. ``dtype``: of the MD state (default: the model's). Forces above
    ``max_force`` eV/Å mean EXPLODED.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"walker names must be unique, got {names}")
    device = pick_device(device)
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    dtype = dtype or _model_dtype(model)
    alpha = committee_alpha(model)
    results: dict[int, WalkerResult] = {}
    queue: list[tuple[int, WalkerSpec]] = []
    for index, spec in enumerate(specs):
        problem = check_finite_settings(spec) or ("" if spec.ensemble in ENSEMBLES else
                                                  f"{spec.name}: ensemble {spec.ensemble!r} is not supported by the batched engine")
        if problem:
            traj = Trajectory(out_dir / f"{spec.name}.extxyz").start()
            results[index] = WalkerResult(spec.name, ERROR, 0, 0, str(traj.path), 0.0, f"ValueError: {problem}", 0.0)
        else:
            queue.append((index, spec))
    if max_atoms is None:
        max_atoms = auto_max_atoms(model, device, [s for _, s in queue[:1]])
    bar = _progress_bar(sum(s.steps for _, s in queue), len(queue), progress)
    need_stress = any(s.ensemble.startswith("npt") for _, s in queue)
    force_call = ForceCall(model, skin, stress=need_stress)
    limits = dict(upper=upper, patience=patience, min_distance=min_distance, max_force=max_force)
    state: MDState | None = None
    mon: Monitor | None = None
    walkers: list[_Walker] = []
    present = None

    def admit() -> None:
        """Move waiting walkers into the batch while they fit; evaluate the newcomers alone."""
        nonlocal state, mon, present
        budget = math.inf if max_atoms is None else max_atoms
        used = sum(len(w.spec.atoms) for w in walkers)
        joining: list[tuple[int, WalkerSpec]] = []
        while queue and (not walkers and not joining or used + len(queue[0][1].atoms) <= budget):
            joining.append(queue.pop(0))
            used += len(joining[-1][1].atoms)
        if not joining:
            return
        try:
            fresh = ForceCall(model, 0.0, stress=need_stress)(
                make_state([setup_of(s) for _, s in joining], dtype=dtype, device=device))
        except Exception:  # noqa: BLE001 - start each alone: a failure stays that walker's own
            kept = []
            for index, spec in joining:
                try:
                    ForceCall(model, 0.0, stress=need_stress)(make_state([setup_of(spec)], dtype=dtype, device=device))
                    kept.append((index, spec))
                except Exception as exc:  # noqa: BLE001
                    traj = Trajectory(out_dir / f"{spec.name}.extxyz").start()
                    results[index] = WalkerResult(spec.name, ERROR, 0, 0, str(traj.path), 0.0, _error(exc), 0.0)
            joining = kept
            if not joining:
                return
            fresh = ForceCall(model, 0.0, stress=need_stress)(
                make_state([setup_of(s) for _, s in joining], dtype=dtype, device=device))
        fresh_mon = Monitor.new(len(joining), dtype, device)
        fresh, fresh_mon = update_monitor(fresh, fresh_mon, **limits)
        now = time.perf_counter()
        walkers.extend(_Walker(i, s, Trajectory(out_dir / f"{s.name}.extxyz").start(), now) for i, s in joining)
        state = fresh if state is None else concat(state, fresh)
        mon = fresh_mon if mon is None else mon.concat(fresh_mon)
        force_call.nl.reset()
        present = integrators.kinds(state)
        look(only=set(range(len(walkers) - len(joining), len(walkers))))

    def look(only: set[int] | None = None) -> None:
        """Host look: write due frames, retire stopped/finished walkers (``only``: just these batch slots)."""
        nonlocal state, mon, present
        assert state is not None and mon is not None
        slots = [k for k in range(len(walkers)) if only is None or k in only]
        if not any(walkers[k].spec.records(walkers[k].step) for k in slots):
            return  # no frame due: nothing is read from the device (stops wait for the next frame step)
        code = mon.code.cpu().numpy()
        due = [k for k in slots if code[k] != RUNNING or walkers[k].spec.records(walkers[k].step)]
        host = _host_copy(state)
        stop_step, worst = mon.stop_step.cpu().numpy(), mon.worst.cpu().numpy()
        leaving = []
        for k in due:
            w = walkers[k]
            status, message, step = DONE, "", w.step
            if code[k] != RUNNING:
                step = int(stop_step[k])
                status = UNCERTAIN if code[k] == STOP_UNCERTAIN else EXPLODED
                message = uncertain_message(upper, patience) if status == UNCERTAIN else exploded_message(
                    finite=code[k] != STOP_NONFINITE, max_force=float(host["max_abs_force"][k]),
                    min_distance=float(host["min_distance"][k]), limit_distance=min_distance, limit_force=max_force)
            w.trajectory.append(_frame(host, k, w, step, alpha))
            if status != DONE or step >= w.spec.steps:
                results[w.index] = WalkerResult(w.spec.name, status, step, w.trajectory.frames, str(w.trajectory.path),
                                                float(worst[k]), message, time.perf_counter() - w.started)
                leaving.append(k)
                if bar is not None:
                    bar.update(max(w.spec.steps - step, 0))
        if leaving:
            retire(leaving)

    def retire(slots: list[int]) -> None:
        """Take the walkers in batch ``slots`` out of the batch; the others' state is untouched."""
        nonlocal state, mon, present
        assert state is not None and mon is not None
        keep = [k for k in range(len(walkers)) if k not in set(slots)]
        for k in sorted(slots, reverse=True):
            walkers.pop(k)
        if keep:
            index = torch.tensor(keep, dtype=torch.long, device=device)
            state, mon = select(state, index), mon.select(index)
            present = integrators.kinds(state)
        else:
            state, mon = None, None
        force_call.nl.reset()

    with torch.no_grad():
        while queue or walkers:
            if queue:
                admit()
            if not walkers:
                continue
            assert state is not None and mon is not None
            force_call.want_spread = any(w.spec.records(w.step + 1) for w in walkers)
            try:
                stepped = integrators.step(state, force_call, present)
            except Exception as exc:  # noqa: BLE001 - find the walker(s) that fail alone; the others go on
                culprits = _culprits(state, model, need_stress, len(walkers)) or list(range(len(walkers)))
                for k in culprits:
                    w = walkers[k]
                    results[w.index] = WalkerResult(w.spec.name, ERROR, w.step, w.trajectory.frames,
                                                    str(w.trajectory.path), float(mon.worst[k]), _error(exc),
                                                    time.perf_counter() - w.started)
                retire(culprits)
                continue
            state, mon = update_monitor(stepped, mon, **limits)
            for w in walkers:
                w.step += 1
            if bar is not None:
                bar.update(len(walkers))
            look()
    if bar is not None:
        bar.close()
    ordered = [results[i] for i in range(len(specs))]
    write_results(out_dir, ordered)
    return ordered


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"


def _culprits(state: MDState, model: Any, stress: bool, n: int) -> list[int]:
    """Batch slots whose step raises when taken alone (the step is replayed on a copy: counter-based noise)."""
    bad = []
    for k in range(n):
        try:
            integrators.step(select(state, torch.tensor([k], device=state.device)), ForceCall(model, 0.0, stress))
        except Exception:  # noqa: BLE001
            bad.append(k)
    return bad


def _host_copy(state: MDState) -> dict[str, np.ndarray]:
    names = ("positions", "momenta", "cells", "forces", "force_deviation", "energy", "max_force_deviation",
             "energy_deviation_per_atom", "min_distance", "max_abs_force", "n_atoms", "step")
    host = {n: getattr(state, n).detach().cpu().numpy() for n in names}
    host["starts"] = np.concatenate([[0], np.cumsum(host["n_atoms"])[:-1]])
    return host


def _frame(host: dict[str, np.ndarray], k: int, w: _Walker, step: int, alpha: float | None) -> Atoms:
    s, n = int(host["starts"][k]), int(host["n_atoms"][k])
    atoms = Atoms(numbers=w.spec.atoms.numbers, positions=host["positions"][s:s + n], cell=host["cells"][k],
                  pbc=w.spec.atoms.pbc, momenta=host["momenta"][s:s + n])
    scores = {"energy": host["energy"][k], "forces": host["forces"][s:s + n],
              "force_deviation": host["force_deviation"][s:s + n],
              keys.MAX_FORCE_DEVIATION: host["max_force_deviation"][k],
              keys.ENERGY_DEVIATION_PER_ATOM: host["energy_deviation_per_atom"][k]}
    temperature = ramp(w.spec.temperature, step / w.spec.steps)
    return scored_frame(atoms, scores, step, w.spec.name, temperature, alpha=alpha)


def _progress_bar(total: int, n_walkers: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"MD batched ({n_walkers} walkers)", unit="walker-step", dynamic_ncols=True)
