"""Cached training graphs and error metrics of potentials and committees against labelled frames.

``GraphCache`` builds every frame's batch (neighbor list + labels, ``alflow.graph``)
once: positions do not change during training, so an epoch only concatenates
cached per-frame graphs (edge indices offset by the atoms before them).

``evaluate(model, frames)`` returns errors in these units (``UNITS``):
energy MAE/RMSE per atom in eV/atom, force MAE/RMSE over Cartesian components in
eV/Å, stress RMSE over the 9 components of frames that carry a stress in eV/Å³
(None when no frame does). For a committee (anything with ``members``) the
errors are those of the members' mean prediction: a ``Committee``'s own forward
(its ``energy``/``forces``/``stress`` are the means), or the mean of a list of models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from ase import Atoms
from torch import nn

from alflow import keys
from alflow.devices import resolve_device  # noqa: F401 - re-exported: the one device resolver
from alflow.graph import STRESS_MASK, atoms_to_batch

UNITS = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å³"}


def members_of(model: nn.Module) -> list[nn.Module]:
    """The committee members of ``model`` (its ``members``), or ``[model]`` for a single potential."""
    members = getattr(model, "members", None)
    return list(members) if members is not None else [model]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point dtype of ``model``'s parameters (or buffers; default dtype if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    return next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))


class GraphCache:
    """Per-frame batches with labels, built once; ``collate(indices)`` concatenates them into one batch."""

    def __init__(self, frames: Sequence[Atoms], cutoff: float, dtype: torch.dtype, device: torch.device) -> None:
        self.cutoff, self.dtype, self.device = float(cutoff), dtype, device
        self.graphs = [atoms_to_batch(a, cutoff, dtype=dtype, device=device, labels=True) for a in frames]
        present = [set(g) for g in self.graphs]
        optional = set().union(*present) - set.intersection(*present) if present else set()
        for key in optional:  # per-structure extras (total charge) present on some frames only: 0 elsewhere
            for g in self.graphs:
                g.setdefault(key, torch.zeros(1, dtype=dtype, device=device))
        self.n_atoms = [len(a) for a in frames]
        self.has_stress = [bool(g[STRESS_MASK].any()) for g in self.graphs]

    def __len__(self) -> int:
        return len(self.graphs)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """One batch of the frames ``indices`` (in that order)."""
        parts = [self.graphs[int(i)] for i in indices]
        if len(parts) == 1:
            return parts[0]
        offsets, total = [], 0
        for i in indices:
            offsets.append(total)
            total += self.n_atoms[int(i)]
        # per-atom, per-structure and per-edge tensors alike concatenate along dim 0 (optional keys: charge)
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in (keys.EDGE_INDEX, keys.BATCH)}
        out[keys.EDGE_INDEX] = torch.cat([p[keys.EDGE_INDEX] + off for p, off in zip(parts, offsets)], dim=1)
        out[keys.BATCH] = torch.repeat_interleave(
            torch.arange(len(parts), device=self.device), out[keys.N_ATOMS].to(self.device)
        )
        return out

    def batches(self, indices: Sequence[int], batch_size: int) -> list[list[int]]:
        """``indices`` cut into consecutive chunks of ``batch_size`` frames."""
        idx = [int(i) for i in indices]
        return [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]


class ErrorAccumulator:
    """Running sums of energy (per atom), force and stress errors; ``result()`` gives MAE/RMSE and MSEs."""

    def __init__(self, device: torch.device) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.e_abs, self.e_sq, self.f_abs, self.f_sq, self.s_sq = z(), z(), z(), z(), z()
        self.n_frames = self.n_atoms = self.n_force = self.n_stress = 0

    @torch.no_grad()
    def add(self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], stress: bool) -> None:
        n = batch[keys.N_ATOMS].to(pred[keys.ENERGY].dtype)
        de = ((pred[keys.ENERGY] - batch[keys.REF_ENERGY]) / n).double()
        self.e_abs += de.abs().sum()
        self.e_sq += (de**2).sum()
        self.n_frames += int(de.shape[0])
        self.n_atoms += int(batch[keys.POSITIONS].shape[0])
        if keys.FORCES in pred:
            df = (pred[keys.FORCES] - batch[keys.REF_FORCES]).double()
            self.f_abs += df.abs().sum()
            self.f_sq += (df**2).sum()
            self.n_force += df.numel()
        if stress and keys.STRESS in pred:
            mask = batch[STRESS_MASK]
            ds = (pred[keys.STRESS] - batch[keys.REF_STRESS])[mask].double()
            self.s_sq += (ds**2).sum()
            self.n_stress += int(mask.sum())

    def result(self) -> dict[str, Any]:
        def ratio(x: torch.Tensor, n: int) -> float | None:
            return float(x) / n if n else None

        e_mse, f_mse = ratio(self.e_sq, self.n_frames), ratio(self.f_sq, self.n_force)
        s_mse = ratio(self.s_sq, 9 * self.n_stress)
        return {
            "n_frames": self.n_frames,
            "n_atoms": self.n_atoms,
            "energy_mae": ratio(self.e_abs, self.n_frames),
            "energy_rmse": math.sqrt(e_mse) if e_mse is not None else None,
            "forces_mae": ratio(self.f_abs, self.n_force),
            "forces_rmse": math.sqrt(f_mse) if f_mse is not None else None,
            "stress_rmse": math.sqrt(s_mse) if s_mse is not None else None,
            "n_stress_frames": self.n_stress,
            "_mse": (e_mse or 0.0, f_mse or 0.0, s_mse or 0.0),
        }


def predict(models: Sequence[nn.Module], batch: dict[str, torch.Tensor], stress: bool) -> dict[str, torch.Tensor]:
    """Mean energy, forces (and stress) of ``models`` on ``batch``, detached (eval mode, autograd for forces)."""
    outs = []
    with torch.enable_grad():
        for m in models:
            out = m(batch, forces=True, stress=stress, create_graph=False)
            outs.append({k: v.detach() for k, v in out.items() if k in (keys.ENERGY, keys.FORCES, keys.STRESS)})
    if len(outs) == 1:
        return outs[0]
    return {k: torch.stack([o[k] for o in outs]).mean(0) for k in outs[0]}


def evaluate_cached(
    models: Sequence[nn.Module], cache: GraphCache, indices: Sequence[int], batch_size: int, stress: bool = True
) -> dict[str, Any]:
    """Errors of the mean of ``models`` on the cached frames ``indices`` (see ``evaluate``); ``_mse`` is internal."""
    acc = ErrorAccumulator(cache.device)
    training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for chunk in cache.batches(indices, batch_size):
            with_stress = stress and any(cache.has_stress[i] for i in chunk)
            batch = cache.collate(chunk)
            acc.add(predict(models, batch, with_stress), batch, with_stress)
    finally:
        for m, t in zip(models, training):
            m.train(t)
    return acc.result()


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without internal entries (JSON-ready)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def evaluate(
    model: nn.Module, frames: Sequence[Atoms], batch_size: int = 16, *, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Errors of ``model`` (a Potential, or a committee's mean) on labelled ``frames``.

    Returns n_frames, n_atoms, energy_mae / energy_rmse (eV/atom), forces_mae /
    forces_rmse (eV/Å), stress_rmse (eV/Å³, over frames with a REF_stress; None if none)
    and n_stress_frames. ``device`` defaults to the model's.
    """
    if not frames:
        raise ValueError("frames: expected at least one labelled frame to evaluate, got none")
    cutoffs = {float(m.cutoff) for m in members_of(model)}
    if len(cutoffs) != 1:
        raise ValueError(f"committee members have different cutoffs {sorted(cutoffs)}; expected one")
    target = resolve_device(device) if device is not None else model_device(model)
    model.to(target)
    cache = GraphCache(frames, cutoffs.pop(), model_dtype(model), target)
    return public(evaluate_cached([model], cache, range(len(cache)), batch_size))
