"""Evaluate a potential or committee on many structures in one batch.

:class:`ModelEvaluator` turns a list of ``ase.Atoms`` into one batch, runs the
model once (one forward and one backward for every structure and member), and
splits the results back per structure as numpy arrays in eV, eV/Å, eV/Å³.

:class:`LockstepBatcher` lets many MD walkers, each driven by its own ASE
integrator in its own thread, share that one batched call: a walker's calculator
submits its structure and blocks; when every live walker is waiting, the batch is
evaluated once and each walker resumes with its own results. Any ASE integrator
works unchanged, and N walkers cost one model call per step instead of N.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from alflow import keys
from alflow.devices import resolve_device
from alflow.graph import atoms_to_batch


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.get_default_dtype())


def skips_spread(model: Any) -> bool:
    """Whether ``model(..., spread=False)`` saves work: a shallow committee with per-head forces
    (``sparse_spread``) gives the mean forces at one model's cost and NaN deviations."""
    return bool(getattr(model, "sparse_spread", False) and getattr(model, "forces_mode", "") == "heads")


class ModelEvaluator:
    """Batched energy/forces/stress (+ committee scores) of a Potential or Committee.

    Results per structure: ``energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress``
    (3, 3) eV/Å³ (3D-periodic cells only, else None), ``min_distance`` (Å, from the
    neighbor list; inf when no pair is within the cutoff) and, for a committee,
    ``energies`` (K,), ``forces_comm`` (K, N, 3), ``max_force_deviation`` (eV/Å),
    ``energy_deviation_per_atom`` (eV/atom), ``force_deviation`` (N,).
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.dtype = model_dtype(self.model)
        self.cutoff = float(model.cutoff)
        self.calls = 0  # number of batched model calls (for tests and progress)
        self.spread_calls = 0  # of which computed the committee spread
        # a shallow committee can skip its heads' K backward passes (mean forces at one model's cost, NaN
        # deviations); ``__call__(..., spread=False)`` asks for that where nobody reads the deviation
        self.sparse = skips_spread(model)

    def __call__(self, frames: Sequence[Atoms], stress: bool | None = None, spread: bool = True) -> list[dict[str, Any]]:
        """Results per frame (class docstring); ``spread=False``: NaN deviations where the model can skip them."""
        if not frames:
            return []
        batch = atoms_to_batch(frames, self.cutoff, dtype=self.dtype, device=self.device)
        periodic = [bool(a.pbc.all()) for a in frames]
        want_stress = any(periodic) if stress is None else stress
        skip = self.sparse and not spread
        out = self.model(batch, forces=True, stress=want_stress, **({"spread": False} if skip else {}))
        self.calls += 1
        self.spread_calls += 0 if skip else 1
        out = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        counts = batch[keys.N_ATOMS].cpu().numpy()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        edge_i = batch[keys.EDGE_INDEX][0].cpu().numpy()
        pair_d = self._pair_distances(batch)
        owner = batch[keys.BATCH].cpu().numpy()[edge_i] if len(edge_i) else np.zeros(0, dtype=int)
        min_d = np.full(len(frames), np.inf)
        if len(pair_d):
            np.minimum.at(min_d, owner, pair_d)
        results = []
        for b, (s, n) in enumerate(zip(starts, counts)):
            r: dict[str, Any] = {
                "energy": float(out[keys.ENERGY][b]),
                "forces": out[keys.FORCES][s : s + n],
                "stress": out[keys.STRESS][b] if want_stress and periodic[b] else None,
                "min_distance": float(min_d[b]),
            }
            if keys.FORCES_COMM in out:
                r["energies"] = out[keys.ENERGIES][:, b]
                r["forces_comm"] = out[keys.FORCES_COMM][:, s : s + n]
                if keys.STRESS_COMM in out and r["stress"] is not None:
                    r["stress_comm"] = out[keys.STRESS_COMM][:, b]
                r["force_deviation"] = out["force_deviation"][s : s + n]
                r[keys.MAX_FORCE_DEVIATION] = float(out[keys.MAX_FORCE_DEVIATION][b])
                r[keys.ENERGY_DEVIATION_PER_ATOM] = float(out[keys.ENERGY_DEVIATION_PER_ATOM][b])
            else:
                r["force_deviation"] = np.zeros(n)
                r[keys.MAX_FORCE_DEVIATION] = 0.0
                r[keys.ENERGY_DEVIATION_PER_ATOM] = 0.0
            results.append(r)
        return results

    @staticmethod
    def _pair_distances(batch: dict[str, torch.Tensor]) -> np.ndarray:
        i, j = batch[keys.EDGE_INDEX]
        if i.numel() == 0:
            return np.zeros(0)
        cell = batch[keys.CELL][batch[keys.BATCH][i]]
        d = batch[keys.POSITIONS][j] - batch[keys.POSITIONS][i] + torch.einsum("ek,ekx->ex", batch[keys.SHIFTS], cell)
        return torch.linalg.norm(d, dim=-1).detach().cpu().numpy()


class LockstepBatcher:
    """Collects one structure from each live walker thread and evaluates them together.

    ``register()`` a walker before its thread starts and ``retire()`` it when it
    stops. ``compute(atoms)`` blocks until every live walker is waiting, then the
    last one to arrive runs the batch and wakes the others. ``compute(atoms, spread=False)``:
    this walker does not read the committee spread of this structure; the batch skips it
    (where the model can, :class:`ModelEvaluator`) only when no walker in it wants it.
    """

    def __init__(self, evaluate: ModelEvaluator) -> None:
        self.evaluate = evaluate
        self._cond = threading.Condition()
        self._live = 0
        self._pending: dict[int, Atoms] = {}
        self._want_spread: dict[int, bool] = {}
        self._results: dict[int, dict[str, Any] | BaseException] = {}
        self._next_id = 0

    def register(self) -> None:
        with self._cond:
            self._live += 1

    def retire(self) -> None:
        with self._cond:
            self._live -= 1
            self._maybe_run()

    def compute(self, atoms: Atoms, spread: bool = True) -> dict[str, Any]:
        with self._cond:
            ticket = self._next_id
            self._next_id += 1
            self._pending[ticket] = atoms.copy()
            self._want_spread[ticket] = bool(spread)
            self._maybe_run()
            while ticket not in self._results:
                self._cond.wait()
            result = self._results.pop(ticket)
        if isinstance(result, BaseException):
            raise result
        return result

    def _maybe_run(self) -> None:
        """Run the batch when all live walkers wait (call with the lock held)."""
        if not self._pending or len(self._pending) < self._live:
            return
        tickets = list(self._pending)
        frames = [self._pending.pop(t) for t in tickets]
        spread = any([self._want_spread.pop(t) for t in tickets])  # a list: every ticket is popped
        evaluate = self.evaluate if spread else functools.partial(self.evaluate, spread=False)
        self._results.update(zip(tickets, evaluate_isolated(evaluate, frames)))
        self._cond.notify_all()


def nonfinite_result(atoms: Atoms) -> dict[str, Any]:
    """The result of a structure with NaN/inf positions or cell: NaN scores, no model call (the walker explodes)."""
    n = len(atoms)
    return {"energy": float("nan"), "forces": np.full((n, 3), np.nan), "stress": None, "min_distance": float("nan"),
            "force_deviation": np.full(n, np.nan), keys.MAX_FORCE_DEVIATION: float("nan"),
            keys.ENERGY_DEVIATION_PER_ATOM: float("nan")}


def evaluate_isolated(evaluate: Any, frames: Sequence[Atoms]) -> list[dict[str, Any] | BaseException]:
    """``evaluate(frames)``, with each frame's failure kept to that frame.

    Frames with non-finite positions or cell get :func:`nonfinite_result` without a model call;
    when the batched call of the others raises, each is evaluated alone, so one broken walker
    never ends the healthy ones (an exception is returned in place of its result, never raised).
    """
    results: list[dict[str, Any] | BaseException | None] = [None] * len(frames)
    good = []
    for index, atoms in enumerate(frames):
        if np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell.array).all():
            good.append(index)
        else:
            results[index] = nonfinite_result(atoms)
    if good:
        try:
            for index, r in zip(good, evaluate([frames[i] for i in good])):
                results[index] = r
        except BaseException as exc:  # noqa: BLE001 - isolate the culprit: one call per frame
            if len(good) == 1:
                results[good[0]] = exc
            else:
                for index in good:
                    try:
                        results[index] = evaluate([frames[index]])[0]
                    except BaseException as single:  # noqa: BLE001 - this frame's own failure
                        results[index] = single
    return results  # type: ignore[return-value]
