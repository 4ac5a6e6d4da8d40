"""Training of one potential and of a committee on labelled frames (recipe per architecture: docs/training.md).

Recipe (``_fit``, ``_fit_grouped``; every knob is a ``training`` field):

* Loss per member: ``energy_weight`` · mean_frames ℓ((E - E_ref)/N) + ``forces_weight`` ·
  mean over force components ℓ(F - F_ref) + ``stress_weight`` · mean over the 9 components
  of frames that carry a stress ℓ(σ - σ_ref); ℓ(d) = d² (``loss: mse``) or 2·Huber(d, δ)
  (``loss: huber``: d² for |d| ≤ ``huber_delta``, linear beyond): eV²/atom², (eV/Å)², (eV/Å³)².
* Normalisation of a fresh model (no ``init_from``): E0 per element by least squares on
  the training frames (``alflow.data.fit_e0``, in the order of ``model.species``; 0 for a
  species absent from the data), shift = mean over training frames of (E - Σ E0)/N
  (eV/atom) and scale = RMS of the training force components (eV/Å; the std of the
  per-atom residual energy, or 1, when forces are all zero), the MACE/nequip recipe.
* AdamW (lr, weight_decay). LR ``schedule``: ``plateau`` halves the LR after more than
  max(1, patience // 3) epochs without a 1e-4 relative improvement of the validation loss
  (floor lr/1000; torch's ReduceLROnPlateau), ``cosine`` decays it to lr/100 over the
  epochs before the final stage; a linear warm-up from lr/100 over ``warmup_epochs``.
  Gradient-norm clipping at ``grad_clip`` (per member); EMA of the weights with decay
  min(ema_decay, (1+n)/(10+n)) after n steps. Validation, early stopping (``patience``
  epochs without a lower validation loss), the best checkpoint and the returned weights
  all use the EMA weights. The validation loss is the weighted MSE of the split, whatever
  ``loss`` is.
* Final stage (``final_epochs`` > 0; MACE's "stage two"): from epoch
  ``epochs - final_epochs + 1``, or as soon as stage one stops early, a member restarts
  from its best weights with the energy weight ``final_energy_weight`` (default 10 ×
  ``energy_weight``) and the constant LR ``lr * final_lr_factor``, for at most
  ``final_epochs`` epochs (never past ``epochs``), early-stopped on the validation loss
  with the final weights (the best stage-one weights are its first candidate).
* Data on the device: every frame's graph is built once (``GraphCache``) and packed into
  flat tensors on the training device (``PackedGraphs``); a batch is gathered by index (one
  host→device copy of index arrays, no Python loop over frames). ``batch_atoms`` fills a
  batch to that many atoms (at least one frame), else ``batch_size`` frames. Losses and
  the non-finite flag stay on the device and are read every ``READ_EVERY`` steps and at
  the end of an epoch.
* Members (``training.members``): ``sequential`` trains them one after another;
  ``grouped`` trains all K at once with stacked parameters (``torch.func.functional_call``
  + ``torch.vmap``), each member with its own batch order (seed + k), bootstrap, LR and
  early stopping: member batches are padded to one atom/edge/structure count with a dummy
  two-atom structure (masked out of the loss), one AdamW runs over the stacked tensors
  (elementwise, so it equals K AdamWs) with a per-member LR and update mask that freezes
  stopped members. ``auto``: grouped on an accelerator, sequential on the CPU (grouped
  measured no faster there, docs/benchmarks.md) and for ``SEQUENTIAL_ARCHITECTURES``. Both paths give the same losses to float
  rounding (tests/alflow/test_train_grouped.py).
* ``max_time_s`` is checked after every batch (per member; K × it for members trained
  together); the validation of the last (partial) epoch and the final metrics run past it.
* Warm start (``init_from``, same architecture/hparams/species/cutoff): weights and the
  E0/scale/shift buffers are copied and kept (not refitted), because the network was
  trained against them; only the optimiser starts afresh. The best checkpoint is chosen
  among the trained epochs (≥ 1): the warm-start weights themselves never win, so new
  labels are never discarded because the old validation frames liked the old model.
* Non-finite loss, gradient norm or validation loss: training stops (noticed at the next
  read-back), the model gets the last good (best) weights back, ``out_dir/best.pt`` keeps
  them, and ``TrainingDivergedError`` is raised.
* float64 on request: ``potential.dtype: float64`` (or ``dtype=`` here) converts the model;
  the graphs follow the model's dtype.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from torch import nn

from alflow import keys
from alflow.config import TrainingConfig
from alflow.graph import STRESS_MASK
from alflow.metrics import UNITS, GraphCache, evaluate_cached, members_of, model_dtype, public, resolve_device
from alflow.neighbors import edge_vectors
from alflow.errors import RuntimeFailure

CHECKPOINT_NAME = "best.pt"
METRICS_NAME = "metrics.json"


class TrainingError(RuntimeFailure):
    """Training could not produce a model."""


class TrainingDivergedError(TrainingError):
    """The loss became NaN/inf; the model holds the last good weights (also in ``checkpoint`` if saved)."""

    def __init__(self, message: str, epoch: int, best_epoch: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.epoch, self.best_epoch, self.checkpoint = epoch, best_epoch, checkpoint


@dataclass(frozen=True)
class TrainResult:
    """One trained potential: split sizes, epochs, timings, losses, metrics (valid, test), file paths.

    ``metrics`` has no "train" entry (a pass over the training frames per member cost as much as
    several epochs; the committee's ``CommitteeTrainResult.metrics`` keeps the train split).
    ``seconds``: this member's training; for members trained together, the joint training.
    """

    architecture: str
    n_train: int
    n_valid: int
    n_test: int
    epochs: int
    best_epoch: int
    stop_reason: str  # "max_epochs" | "patience" | "max_time"
    seconds: float
    warm_start: bool
    initial_valid_loss: float
    best_valid_loss: float
    metrics: dict[str, dict[str, Any]]
    checkpoint: str | None = None
    metrics_path: str | None = None
    history: tuple[dict[str, float | None], ...] = ()  # per epoch; epoch 0 = before training

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": [dict(h) for h in self.history], "units": UNITS}


@dataclass(frozen=True)
class CommitteeTrainResult:
    """A trained committee: the shared split, each member's result and the committee-mean metrics."""

    members: tuple[TrainResult, ...]
    train_idx: tuple[int, ...]
    valid_idx: tuple[int, ...]
    test_idx: tuple[int, ...]
    bootstrap: bool
    seconds: float
    metrics: dict[str, dict[str, Any]]
    checkpoint: str | None = None
    metrics_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [m.to_dict() for m in self.members]
        return {**d, "units": UNITS}


# ----------------------------------------------------------------------------- checks and set-up


def check_frames(frames: Sequence[Atoms], species: Sequence[int], where: str) -> None:
    """Every frame labelled and finite, every element among ``species`` (else an error naming them)."""
    from alflow.io import validate_frame
    from potentials.base import UnknownElementError

    for i, atoms in enumerate(frames):
        validate_frame(atoms, f"{where} frame {i}")
    present = {int(z) for a in frames for z in a.numbers}
    missing = sorted(present - set(species))
    if missing:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        known = ", ".join(chemical_symbols[z] for z in species)
        raise UnknownElementError(f"{where}: element(s) {names} in the data are not among the model's species [{known}]")


def fit_normalization(model: nn.Module, frames: Sequence[Atoms]) -> dict[str, Any]:
    """Set ``model.e0`` (eV, least squares), ``shift`` (eV/atom) and ``scale`` (eV/Å) from ``frames``; see module doc."""
    import warnings

    from alflow.data import fit_e0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient compositions: minimum-norm E0 is fine here
        e0 = fit_e0(frames)
    e0_vec = [e0.get(z, 0.0) for z in model.species]
    residual = np.array([(float(a.info[keys.REF_ENERGY]) - sum(e0[int(z)] for z in a.numbers)) / len(a) for a in frames])
    forces = np.concatenate([np.asarray(a.arrays[keys.REF_FORCES], float).ravel() for a in frames])
    shift = float(residual.mean())
    scale = float(np.sqrt(np.mean(forces**2)))
    if not scale > 1e-8:
        scale = float(residual.std()) if residual.std() > 1e-8 else 1.0
    with torch.no_grad():
        model.e0.copy_(torch.tensor(e0_vec, dtype=model.e0.dtype))
        model.shift.fill_(shift)
        model.scale.fill_(scale)
    return {"e0": dict(zip(model.species, e0_vec)), "shift": shift, "scale": scale}


def _as_model(source: Any) -> nn.Module:
    if isinstance(source, (str, os.PathLike)):
        import potentials

        return potentials.load(source, device="cpu")
    return source


def warm_start(model: nn.Module, source: nn.Module | str | os.PathLike) -> None:
    """Copy weights and E0/scale/shift from ``source`` (same architecture, hparams, species, cutoff)."""
    source = _as_model(source)
    diffs = [
        f"{name} {getattr(source, name, None)!r} != {getattr(model, name, None)!r}"
        for name in ("architecture", "hparams", "species", "cutoff")
        if getattr(source, name, None) != getattr(model, name, None)
    ]
    if diffs:
        raise ValueError(f"init_from: the previous model does not match the new one ({'; '.join(diffs)})")
    model.load_state_dict(source.state_dict())


class EMA:
    """Exponential moving average of the trainable parameters, decay min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float | None) -> None:
        self.decay, self.n = decay, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        if self.decay is None:
            return
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def reset(self) -> None:
        """The shadow weights := the current weights (the step count is kept)."""
        for p, sh in zip(self.params, self.shadow):
            sh.copy_(p)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model inside the block, the raw weights back afterwards."""
        if self.decay is None:
            yield
            return
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


# ----------------------------------------------------------------------------- packed data on the device

READ_EVERY = 50  # training steps between host reads of the accumulated losses / non-finite flag
ATOM_MASK, STRUCT_MASK, SPECIES = "atom_mask", "struct_mask", "species"
_ATOM_KEYS = (keys.POSITIONS, keys.NUMBERS, keys.REF_FORCES)
_NOT_STRUCT = (*_ATOM_KEYS, keys.EDGE_INDEX, keys.SHIFTS, keys.BATCH)
# trained one member after another under members: auto: torch.vmap cannot map them (bincount /
# repeat_interleave with data-dependent shapes); members: grouped tries, warns and falls back
SEQUENTIAL_ARCHITECTURES = frozenset({"ani", "dimenetpp"})


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges [starts[i], starts[i] + counts[i]) as one int64 array."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    before = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, counts) + np.arange(total, dtype=np.int64)


class PackedGraphs:
    """Every frame of a ``GraphCache`` in flat tensors on its device; a batch is gathered by index.

    Per-atom tensors (positions Å, numbers, REF_forces eV/Å, the species index) are
    concatenated over frames, edges keep frame-local atom indices (offset at gather time),
    per-structure tensors (cell, pbc, n_atoms, REF_energy, REF_stress, stress_mask, charge)
    are stacked. Two dummy atoms (cutoff/2 apart), one dummy edge between them and one
    dummy structure follow the real ones: the padding of members trained together.
    Frame sizes live on the host (numpy), so a batch's index arrays are built there and
    copied to the device in one transfer; nothing is read back.
    """

    def __init__(self, cache: GraphCache, species_index: Any) -> None:
        graphs = cache.graphs
        dev, dtype = cache.device, cache.dtype
        self.device, self.dtype, self.cutoff = dev, dtype, cache.cutoff
        self.n_atoms = np.array([int(g[keys.POSITIONS].shape[0]) for g in graphs], dtype=np.int64)
        self.n_edges = np.array([int(g[keys.EDGE_INDEX].shape[1]) for g in graphs], dtype=np.int64)
        self.atom_start = np.cumsum(self.n_atoms) - self.n_atoms
        self.edge_start = np.cumsum(self.n_edges) - self.n_edges
        self.has_stress = np.array(cache.has_stress, dtype=bool)
        n_atoms, n_edges = int(self.n_atoms.sum()), int(self.n_edges.sum())
        self.dummy_atoms = np.array([n_atoms, n_atoms + 1], dtype=np.int64)
        self.dummy_edge, self.dummy_structure = n_edges, len(graphs)
        atom = {k: torch.cat([g[k] for g in graphs]) for k in _ATOM_KEYS}
        atom[keys.POSITIONS] = torch.cat([atom[keys.POSITIONS], torch.tensor(
            [[0.0, 0.0, 0.0], [0.5 * self.cutoff, 0.0, 0.0]], dtype=dtype, device=dev)])
        atom[keys.NUMBERS] = torch.cat([atom[keys.NUMBERS], atom[keys.NUMBERS][:1].repeat(2)])
        atom[keys.REF_FORCES] = torch.cat([atom[keys.REF_FORCES], torch.zeros(2, 3, dtype=dtype, device=dev)])
        atom[SPECIES] = species_index(atom[keys.NUMBERS])  # unknown elements are an error here, once
        self.atom = atom
        self.edges = torch.cat([g[keys.EDGE_INDEX] for g in graphs] + [torch.tensor([[0], [1]], device=dev)], dim=1)
        self.shifts = torch.cat([g[keys.SHIFTS] for g in graphs] + [torch.zeros(1, 3, dtype=dtype, device=dev)])
        self.struct = {}
        for k in (k for k in graphs[0] if k not in _NOT_STRUCT):
            t = torch.cat([g[k] for g in graphs])
            dummy = torch.zeros_like(t[:1])
            if k == keys.CELL:
                dummy = 3.0 * self.cutoff * torch.eye(3, dtype=t.dtype, device=dev)[None]
            elif k == keys.N_ATOMS:
                dummy = dummy + 2
            self.struct[k] = torch.cat([t, dummy])

    def __len__(self) -> int:
        return len(self.n_atoms)

    def _send(self, host: np.ndarray) -> torch.Tensor:
        """Host array → device tensor without waiting for the device (pinned memory: a pageable
        source would make CUDA synchronise the stream before the copy)."""
        tensor = torch.from_numpy(np.ascontiguousarray(host))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def gather(self, frames: Sequence[int]) -> dict[str, torch.Tensor]:
        """One batch of ``frames`` (in that order), as ``alflow.graph`` builds it, plus ``species``."""
        idx = np.asarray(frames, dtype=np.int64)
        na, ne = self.n_atoms[idx], self.n_edges[idx]
        before = np.cumsum(na) - na
        n, e = int(na.sum()), int(ne.sum())
        host = np.concatenate([_ranges(self.atom_start[idx], na), _ranges(self.edge_start[idx], ne),
                               np.repeat(before, ne), np.repeat(np.arange(len(idx), dtype=np.int64), na), idx])
        a, ed, off, b, s = torch.split(self._send(host), [n, e, e, n, len(idx)])
        out = {k: v.index_select(0, a) for k, v in self.atom.items()}
        out[keys.EDGE_INDEX] = self.edges.index_select(1, ed) + off
        out[keys.SHIFTS] = self.shifts.index_select(0, ed)
        out[keys.BATCH] = b
        out.update({k: v.index_select(0, s) for k, v in self.struct.items()})
        return out

    def gather_padded(self, parts: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """K batches, one per member, padded to one shape: every tensor gets a leading K axis.

        Member k's real atoms, edges and structures come first; padding atoms (at least 2)
        belong to the last structure (always a dummy one) and padding edges join its first
        two atoms, so they never touch a real structure. ``atom_mask`` (K, N) and
        ``struct_mask`` (K, B) mark the real ones; empty padding structures count 1 atom.
        """
        na = [self.n_atoms[p] for p in parts]
        ne = [self.n_edges[p] for p in parts]
        n_k = [int(x.sum()) for x in na]
        e_k = [int(x.sum()) for x in ne]
        n, e, b = max(n_k) + 2, max(e_k) + 1, max(len(p) for p in parts) + 1
        rows = []
        for p, a_cnt, e_cnt, n_real, e_real in zip(parts, na, ne, n_k, e_k):
            p = np.asarray(p, dtype=np.int64)
            pad_a, pad_e, pad_b = n - n_real, e - e_real, b - len(p)
            before = np.cumsum(a_cnt) - a_cnt
            counts = np.concatenate([a_cnt, np.ones(pad_b, dtype=np.int64)])
            counts[-1] = pad_a
            rows.append(np.concatenate([
                _ranges(self.atom_start[p], a_cnt), self.dummy_atoms[np.arange(pad_a) % 2],
                _ranges(self.edge_start[p], e_cnt), np.full(pad_e, self.dummy_edge),
                np.repeat(before, e_cnt), np.full(pad_e, n_real),
                np.repeat(np.arange(len(p), dtype=np.int64), a_cnt), np.full(pad_a, b - 1),
                p, np.full(pad_b, self.dummy_structure), counts,
                np.arange(n) < n_real, np.arange(b) < len(p),
            ]).astype(np.int64))
        k = len(parts)
        a, ed, off, bi, s, cnt, am, sm = torch.split(self._send(np.stack(rows)), [n, e, e, n, b, b, n, b], dim=1)
        out = {key: v.index_select(0, a.reshape(-1)).reshape(k, n, *v.shape[1:]) for key, v in self.atom.items()}
        out[keys.EDGE_INDEX] = self.edges.index_select(1, ed.reshape(-1)).reshape(2, k, e).transpose(0, 1) + off[:, None]
        out[keys.SHIFTS] = self.shifts.index_select(0, ed.reshape(-1)).reshape(k, e, 3)
        out[keys.BATCH] = bi
        out.update({key: v.index_select(0, s.reshape(-1)).reshape(k, b, *v.shape[1:]) for key, v in self.struct.items()})
        out[keys.N_ATOMS] = cnt
        out[ATOM_MASK], out[STRUCT_MASK] = am.bool(), sm.bool()
        return out


def make_batches(rng: np.random.Generator | None, indices: Sequence[int], config: TrainingConfig,
                 n_atoms: np.ndarray) -> list[np.ndarray]:
    """``indices`` (shuffled by ``rng`` unless None) cut into batches of ``batch_size`` frames, or filled to
    ``batch_atoms`` atoms (a frame larger than the budget is a batch of its own)."""
    idx = np.asarray(indices, dtype=np.int64)
    if rng is not None:
        idx = rng.permutation(idx)
    if config.batch_atoms is None:
        return [idx[k : k + config.batch_size] for k in range(0, len(idx), config.batch_size)]
    chunks, first, total = [], 0, 0
    for pos, size in enumerate(n_atoms[idx].tolist()):
        if pos > first and total + size > config.batch_atoms:
            chunks.append(idx[first:pos])
            first, total = pos, 0
        total += size
    if first < len(idx):
        chunks.append(idx[first:])
    return chunks


# ----------------------------------------------------------------------------- forward passes and losses


def _single_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], forces: bool, stress: bool, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Energy (B,), forces (N, 3), stress (B, 3, 3) of one potential: ``compute_properties`` with the species
    index taken from the batch (no per-step check of the elements, which reads the device)."""
    from potentials.base import Potential, strained_geometry

    if type(model).forward is not Potential.forward:
        out = model(batch, forces=forces, stress=stress, create_graph=create_graph)
        return out[keys.ENERGY], out.get(keys.FORCES), out.get(keys.STRESS)
    with torch.enable_grad():
        leaf, cell, displacement, positions = strained_geometry(batch, forces, stress)
        edge_index = batch[keys.EDGE_INDEX]
        vectors = edge_vectors(positions, cell, edge_index[0], edge_index[1], batch[keys.SHIFTS], batch[keys.BATCH])
        inner = dict(batch)
        inner[keys.POSITIONS], inner[keys.CELL] = positions, cell
        node = model.node_energies(inner, vectors, batch[SPECIES])
        energy = torch.zeros(batch[keys.CELL].shape[0], dtype=node.dtype, device=node.device)
        energy = energy.index_add(0, batch[keys.BATCH], node)
        f = s = None
        if forces or stress:
            inputs = [leaf] + ([displacement] if stress else [])
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
            if forces:
                f = -grads[0] if grads[0] is not None else torch.zeros_like(leaf)
            if stress:
                g = grads[-1] if grads[-1] is not None else torch.zeros_like(displacement)
                s = g / torch.linalg.det(batch[keys.CELL]).abs().clamp_min(1e-12)[:, None, None]
    return energy, f, s


def _grouped_forward(
    base: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    forces: bool,
    stress: bool,
    create_graph: bool,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Energies (K, B), forces (K, N, 3), stress (K, B, 3, 3) of K stacked members in one vmapped pass.

    ``batch``: one batch for every member (``shared``) or a padded batch per member (leading K axis,
    ``PackedGraphs.gather_padded``). As ``potentials.committee.Committee``: each member gets its own
    positions (and strain) leaf, so one ``autograd.grad`` of the summed energies gives every member's
    derivatives.
    """
    from torch.func import functional_call

    from potentials.committee import _strain

    k = next(iter(params.values())).shape[0]
    cell = batch[keys.CELL]
    positions = batch[keys.POSITIONS].detach()
    positions = (positions.unsqueeze(0).expand(k, -1, -1) if shared else positions).clone()
    if forces or stress:
        positions.requires_grad_(True)
    displacement = None
    if stress:
        displacement = torch.zeros((k, *cell.shape[-3:]), dtype=cell.dtype, device=cell.device, requires_grad=True)

    def member_energy(p, b, bt, r, eps):
        cell0, index = bt[keys.CELL], bt[keys.BATCH]
        c = cell0
        if eps is not None:
            r, c = _strain(r, cell0, eps, index)
        edge_index = bt[keys.EDGE_INDEX]
        vectors = edge_vectors(r, c, edge_index[0], edge_index[1], bt[keys.SHIFTS], index)
        inner = dict(bt)
        inner[keys.POSITIONS], inner[keys.CELL] = r, c
        node = functional_call(base, (p, b), (inner, vectors, bt[SPECIES]))
        return torch.zeros(cell0.shape[0], dtype=node.dtype, device=node.device).index_add(0, index, node)

    with torch.enable_grad():
        in_dims = (0, 0, None if shared else 0, 0, 0 if stress else None)
        energies = torch.vmap(member_energy, in_dims=in_dims, randomness="different")(
            params, fixed, batch, positions, displacement)
        f = s = None
        if forces or stress:
            inputs = [positions] + ([displacement] if stress else [])
            grads = torch.autograd.grad(energies.sum(), inputs, create_graph=create_graph, allow_unused=True)
            if forces:
                f = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
            if stress:
                g = grads[-1] if grads[-1] is not None else torch.zeros_like(displacement)
                s = g / torch.linalg.det(cell).abs().clamp_min(1e-12)[..., None, None]
    return energies, f, s


def _ell(d: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    """d² (mse) or 2·Huber(d, δ): d² for |d| ≤ δ, 2δ|d| - δ² beyond (the same scale as the MSE)."""
    if config.loss == "huber":
        return 2.0 * torch.nn.functional.huber_loss(d, torch.zeros_like(d), reduction="none", delta=config.huber_delta)
    return d * d


def member_losses(
    energy: torch.Tensor,
    forces: torch.Tensor | None,
    stress: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    config: TrainingConfig,
    energy_weight: torch.Tensor | float,
) -> torch.Tensor:
    """The loss (K,) of each member (see the module doc) from predictions with a leading K axis.

    ``batch`` carries the labels with the same leading axis and, for padded batches, ``atom_mask``
    and ``struct_mask``; a member without any real structure gets 0.
    """
    dtype = energy.dtype
    smask = batch[STRUCT_MASK].to(dtype) if STRUCT_MASK in batch else torch.ones_like(energy)
    n = batch[keys.N_ATOMS].to(dtype)
    loss = energy_weight * (_ell((energy - batch[keys.REF_ENERGY]) / n, config) * smask).sum(-1) / smask.sum(-1).clamp_min(1)
    if config.forces_weight > 0 and forces is not None:
        amask = batch[ATOM_MASK].to(dtype) if ATOM_MASK in batch else torch.ones_like(forces[..., 0])
        per_atom = _ell(forces - batch[keys.REF_FORCES], config).sum(-1)
        loss = loss + config.forces_weight * (per_atom * amask).sum(-1) / (3 * amask.sum(-1)).clamp_min(1)
    if stress is not None and config.stress_weight > 0:
        m = batch[STRESS_MASK].to(dtype) * smask
        per_frame = _ell(stress - batch[keys.REF_STRESS], config).sum((-1, -2))
        loss = loss + config.stress_weight * (per_frame * m).sum(-1) / (9 * m.sum(-1)).clamp_min(1)
    return loss


def batch_loss(
    pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], config: TrainingConfig, stress: bool
) -> torch.Tensor:
    """The loss of one potential's predictions on one (unpadded) batch (see the module doc)."""
    lead = {k: batch[k][None] for k in (keys.N_ATOMS, keys.REF_ENERGY, keys.REF_FORCES, keys.REF_STRESS, STRESS_MASK)}
    f, s = pred.get(keys.FORCES), pred.get(keys.STRESS) if stress else None
    return member_losses(pred[keys.ENERGY][None], f[None] if f is not None else None,
                         s[None] if s is not None else None, lead, config, config.energy_weight)[0]


def split_errors(
    forward: Any, packed: PackedGraphs, indices: Sequence[int], config: TrainingConfig, stress: bool, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per member: MSEs (K, 3) of energy per atom (eV²/atom²), force and stress components, and force RMSE (K,).

    ``forward(batch, stress)`` returns energies (K, B), forces (K, N, 3), stress (K, B, 3, 3) or None.
    Sums stay on the device; one read at the end.
    """
    sums = torch.zeros(3, k, dtype=torch.float64, device=packed.device)
    n_e = n_f = n_s = 0
    for chunk in make_batches(None, indices, config, packed.n_atoms):
        with_stress = stress and bool(packed.has_stress[chunk].any())
        batch = packed.gather(chunk)
        e, f, s = forward(batch, with_stress)
        with torch.no_grad():
            n = batch[keys.N_ATOMS].to(e.dtype)
            sums[0] += (((e - batch[keys.REF_ENERGY]) / n) ** 2).double().sum(-1)
            sums[1] += ((f - batch[keys.REF_FORCES]) ** 2).double().sum((-1, -2))
            if s is not None:
                per_frame = ((s - batch[keys.REF_STRESS]) ** 2).double().sum((-1, -2))
                sums[2] += (per_frame * batch[STRESS_MASK]).sum(-1)
                n_s += 9 * int(packed.has_stress[chunk].sum())
        n_e += len(chunk)
        n_f += 3 * int(packed.n_atoms[chunk].sum())
    total = sums.cpu().numpy()
    mse = np.stack([total[0] / max(n_e, 1), total[1] / max(n_f, 1), total[2] / n_s if n_s else 0 * total[2]], axis=1)
    return mse, np.sqrt(mse[:, 1])


def metric_loss(metrics: dict[str, Any], config: TrainingConfig) -> float:
    """The loss of a whole split from its accumulated MSEs."""
    e, f, s = metrics["_mse"]
    return config.energy_weight * e + config.forces_weight * f + config.stress_weight * s


def _write_json(data: dict[str, Any], path: Path) -> str:
    from alflow.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=float))
    return str(path)


# ----------------------------------------------------------------------------- schedule and early stopping


class _Progress:
    """One member's host-side state: stage, LR, plateau, early stopping (the same code drives both paths)."""

    def __init__(self, config: TrainingConfig, warm: bool, initial_mse: np.ndarray) -> None:
        self.c = config
        self.stage = 1
        self.final_from = config.epochs - config.final_epochs + 1 if config.final_epochs else None
        self.energy_weight = config.energy_weight
        self.best_mse = np.asarray(initial_mse, dtype=float)
        self.best_loss = math.inf if warm else self.loss(self.best_mse)
        self.best_epoch, self.bad = 0, 0
        self.plateau_best, self.plateau_bad, self.scale = math.inf, 0, 1.0
        self.final_run, self.done, self.stop_reason = 0, False, "max_epochs"

    def loss(self, mse: np.ndarray) -> float:
        """The validation loss of MSEs (energy, forces, stress) with this stage's weights."""
        return float(self.energy_weight * mse[0] + self.c.forces_weight * mse[1] + self.c.stress_weight * mse[2])

    def lr(self, t: float) -> float:
        """The LR after ``t`` epochs (fractional) of training."""
        c = self.c
        if self.stage == 2:
            return c.lr * c.final_lr_factor
        if c.schedule == "cosine":
            horizon = (self.final_from - 1) if self.final_from else c.epochs
            x = min(t / max(horizon, 1), 1.0)
            lr = c.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * x)))
        else:
            lr = c.lr * self.scale
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            lr *= 0.01 + 0.99 * t / c.warmup_epochs
        return lr

    def end_epoch(self, epoch: int, mse: np.ndarray) -> tuple[bool, bool]:
        """Record epoch ``epoch``'s validation MSEs; returns (improved, the final stage starts now)."""
        c = self.c
        loss = self.loss(mse)
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_mse, self.best_epoch, self.bad = loss, np.asarray(mse, dtype=float), epoch, 0
        else:
            self.bad += 1
        if self.stage == 1 and c.schedule == "plateau":  # torch's ReduceLROnPlateau (rel. threshold 1e-4)
            if loss < self.plateau_best * (1 - 1e-4):
                self.plateau_best, self.plateau_bad = loss, 0
            else:
                self.plateau_bad += 1
            if self.plateau_bad > max(1, c.patience // 3):
                self.scale, self.plateau_bad = max(self.scale * 0.5, 1e-3), 0
        if epoch >= c.epochs:
            self.done = True
            return improved, False
        if self.stage == 2:
            self.final_run += 1
            if self.bad >= c.patience or self.final_run >= c.final_epochs:
                self.done = True
            return improved, False
        stalled = self.bad >= c.patience
        if stalled or (self.final_from is not None and epoch + 1 >= self.final_from):
            if stalled:
                self.stop_reason = "patience"
            if not c.final_epochs:
                self.done = True
                return improved, False
            self.stage, self.bad = 2, 0
            self.energy_weight = c.final_energy_weight if c.final_energy_weight is not None else 10 * c.energy_weight
            self.best_loss = self.loss(self.best_mse)  # the best stage-one weights, judged by the final loss
            return improved, True
        return improved, False


def _history(epoch: int, train_loss: float | None, valid_loss: float, stage: int, f_rmse: float, lr: float,
             start: float) -> dict[str, float | None]:
    return {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_forces_rmse": float(f_rmse),
            "lr": lr, "stage": stage, "seconds": time.perf_counter() - start}


def _diverged(desc: str, what: str, epoch: int, state: _Progress, checkpoint: Path | None) -> TrainingDivergedError:
    where = f"saved in {checkpoint}" if checkpoint is not None else "not saved (no out_dir)"
    return TrainingDivergedError(
        f"{desc}: training diverged ({what} at epoch {epoch}); stopped and restored the last good weights "
        f"(epoch {state.best_epoch}, validation loss {state.best_loss:.6g}), {where}. Lower training.lr or check the labels.",
        epoch=epoch, best_epoch=state.best_epoch, checkpoint=str(checkpoint) if checkpoint else None,
    )


def _final_metrics(model: nn.Module, cache: GraphCache, splits: dict[str, Sequence[int]], config: TrainingConfig
                   ) -> dict[str, dict[str, Any]]:
    return {name: public(evaluate_cached([model], cache, idx, config.batch_size)) for name, idx in splits.items() if len(idx)}


# ----------------------------------------------------------------------------- one member at a time


def _fit(
    model: nn.Module,
    packed: PackedGraphs,
    cache: GraphCache,
    train_idx: Sequence[int],
    valid_idx: Sequence[int],
    test_idx: Sequence[int],
    config: TrainingConfig,
    *,
    seed: int,
    out_dir: Path | None,
    progress: bool,
    warm: bool,
    desc: str,
) -> TrainResult:
    """Train ``model`` (on ``packed.device``) on packed frames; returns with the best EMA weights loaded."""
    import potentials
    from tqdm.auto import tqdm

    start = time.perf_counter()
    deadline = start + config.max_time_s if config.max_time_s else None
    rng = np.random.default_rng(seed)
    use_stress = config.stress_weight > 0
    use_forces = config.forces_weight > 0 or use_stress
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay)
    checkpoint = out_dir / CHECKPOINT_NAME if out_dir is not None else None

    def forward(batch: dict[str, torch.Tensor], stress: bool) -> tuple:
        e, f, s = _single_forward(model, batch, True, stress, False)
        return e.detach()[None], f.detach()[None], s.detach()[None] if s is not None else None

    def validate() -> tuple[np.ndarray, float]:
        model.eval()
        with ema.applied():
            mse, f_rmse = split_errors(forward, packed, valid_idx, config, use_stress, 1)
        return mse[0], float(f_rmse[0])

    def keep_best() -> dict[str, torch.Tensor]:
        with ema.applied():
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                potentials.save(model, checkpoint)
        return state

    mse0, f0 = validate()
    state = _Progress(config, warm, mse0)
    initial_loss = state.loss(mse0)
    if not math.isfinite(initial_loss):
        raise TrainingError(f"{desc}: the initial validation loss is {initial_loss}; check the model and the labels")
    # a fresh model's initial weights may be kept (nothing better found); a warm-started model's may not: they
    # have not seen the new labels, which in active learning sit where the model is wrong and rarely in the
    # (content-split) validation set, so its validation loss often rises first and "best" would discard them
    best_state = keep_best()
    history = [_history(0, None, initial_loss, 1, f0, state.lr(0.0), start)]
    stop_reason, epoch = "max_epochs", 0

    def diverged(what: str, epoch: int) -> TrainingDivergedError:
        model.load_state_dict(best_state)
        return _diverged(desc, what, epoch, state, checkpoint)

    bar = tqdm(total=config.epochs, desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            plan = make_batches(rng, train_idx, config, packed.n_atoms)
            total = torch.zeros((), dtype=torch.float64, device=packed.device)
            bad = torch.zeros((), dtype=torch.bool, device=packed.device)
            count, out_of_time, lr = 0, False, config.lr
            for step, chunk in enumerate(plan):
                lr = state.lr(epoch - 1 + step / len(plan))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = packed.gather(chunk)
                stress = use_stress and bool(packed.has_stress[chunk].any())
                e, f, s = _single_forward(model, batch, use_forces, stress, True)
                loss = member_losses(e[None], f[None] if f is not None else None, s[None] if s is not None else None,
                                     {k: v[None] for k, v in batch.items()}, config, state.energy_weight)[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                finite = torch.isfinite(loss.detach())
                if config.grad_clip is not None:
                    finite = finite & torch.isfinite(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
                bad = bad | ~finite
                optimizer.step()
                ema.update()
                total = total + loss.detach().double() * len(chunk)
                count += len(chunk)
                if (step + 1) % READ_EVERY == 0 and bool(bad):
                    raise diverged("a non-finite training loss or gradient norm", epoch)
                if deadline is not None and time.perf_counter() > deadline:
                    out_of_time = True
                    break
            if bool(bad):
                raise diverged("a non-finite training loss or gradient norm", epoch)
            train_loss = float(total) / max(count, 1)
            mse, f_rmse = validate()
            valid_loss = state.loss(mse)
            if not math.isfinite(valid_loss):
                raise diverged(f"validation loss {valid_loss}", epoch)
            stage = state.stage
            improved, final = state.end_epoch(epoch, mse)
            if improved:
                best_state = keep_best()
            if final:  # the final stage restarts from the best weights
                model.load_state_dict(best_state)
                ema.reset()
            history.append(_history(epoch, train_loss, valid_loss, stage, f_rmse, lr, start))
            bar.set_postfix(train=f"{train_loss:.4g}", valid=f"{valid_loss:.4g}", f_rmse=f"{f_rmse:.4f}",
                            best=state.best_epoch, refresh=False)
            bar.update(1)
            if out_of_time:
                stop_reason = "max_time"
                break
            if state.done:
                stop_reason = state.stop_reason
                break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - start
    metrics = _final_metrics(model, cache, {"valid": valid_idx, "test": test_idx}, config)
    result = TrainResult(
        architecture=getattr(model, "architecture", type(model).__name__), n_train=len(train_idx),
        n_valid=len(valid_idx), n_test=len(test_idx), epochs=epoch, best_epoch=state.best_epoch,
        stop_reason=stop_reason, seconds=seconds, warm_start=warm, initial_valid_loss=initial_loss,
        best_valid_loss=state.best_loss, metrics=metrics, checkpoint=str(checkpoint) if checkpoint else None,
        metrics_path=str(out_dir / METRICS_NAME) if out_dir is not None else None, history=tuple(history),
    )
    if out_dir is not None:
        _write_json(result.to_dict(), out_dir / METRICS_NAME)
    return result


# ----------------------------------------------------------------------------- all members at once


class StackedAdamW:
    """AdamW over member-stacked tensors (K, ...) with a per-member LR, step count and update mask.

    Elementwise as ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8): one instance over the
    stacked tensors equals K AdamWs; a member whose mask is False is left untouched (its
    moments and step count too).
    """

    def __init__(self, params: Sequence[torch.Tensor], weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.weight_decay, self.betas, self.eps = list(params), weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], dtype=torch.float64, device=self.params[0].device)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], lr: torch.Tensor, on: torch.Tensor) -> None:
        """One step with ``grads`` (as params), ``lr`` (K,) and ``on`` (K,) bool."""
        b1, b2 = self.betas
        self.steps += on
        t = self.steps.clamp_min(1)
        bc1, bc2_sqrt = 1 - b1**t, (1 - b2**t).sqrt()
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            shape = (-1,) + (1,) * (p.ndim - 1)
            mask = on.view(shape)
            lr_k = lr.to(p.dtype).view(shape)
            m.copy_(torch.where(mask, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(mask, v * b2 + (1 - b2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.to(p.dtype).view(shape) + self.eps
            new = p * (1 - lr_k * self.weight_decay) - (lr_k / bc1.to(p.dtype).view(shape)) * m / denom
            p.copy_(torch.where(mask, new, p))


class GroupedUnsupported(RuntimeError):
    """torch.vmap cannot train this architecture's members together (raised before any update)."""


def _fit_grouped(
    members: Sequence[nn.Module],
    packed: PackedGraphs,
    cache: GraphCache,
    member_idx: Sequence[np.ndarray],
    valid_idx: Sequence[int],
    test_idx: Sequence[int],
    config: TrainingConfig,
    *,
    seeds: Sequence[int],
    out_dirs: Sequence[Path | None],
    progress: bool,
    warm: Sequence[bool],
) -> list[TrainResult]:
    """Train K members together (see the module doc); returns each member's result, best EMA weights loaded."""
    import potentials
    from tqdm.auto import tqdm

    from potentials.committee import _NodeEnergies

    start = time.perf_counter()
    k_members = len(members)
    deadline = start + k_members * config.max_time_s if config.max_time_s else None
    use_stress = config.stress_weight > 0
    use_forces = config.forces_weight > 0 or use_stress
    dev = packed.device
    ref = members[0]
    base = _NodeEnergies(ref)
    trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
    with torch.no_grad():
        params = {f"model.{n}": torch.stack([m.get_parameter(n).detach() for m in members]).requires_grad_(True)
                  for n in trainable}
        fixed = {f"model.{n}": torch.stack([m.get_parameter(n).detach() for m in members])
                 for n, p in ref.named_parameters() if not p.requires_grad}
        fixed.update({f"model.{n}": torch.stack([m.get_buffer(n) for m in members]) for n, _ in ref.named_buffers()})
    plist = list(params.values())
    optimizer = StackedAdamW(plist, config.weight_decay)
    use_ema = config.ema_decay is not None
    shadow = {n: p.detach().clone() for n, p in params.items()} if use_ema else params
    best = {n: p.detach().clone() for n, p in shadow.items()}
    ema_n = torch.zeros(k_members, dtype=torch.float64, device=dev)
    rngs = [np.random.default_rng(s) for s in seeds]
    checkpoints = [d / CHECKPOINT_NAME if d is not None else None for d in out_dirs]
    descs = [f"member {k + 1}/{k_members}" for k in range(k_members)]

    def validate() -> tuple[np.ndarray, np.ndarray]:
        ref.eval()

        def forward(batch: dict[str, torch.Tensor], stress: bool) -> tuple:
            e, f, s = _grouped_forward(base, {n: t.detach() for n, t in shadow.items()}, fixed, batch, True, stress,
                                       False, shared=True)
            return e.detach(), f.detach(), s.detach() if s is not None else None

        return split_errors(forward, packed, valid_idx, config, use_stress, k_members)

    def install() -> None:
        """Copy the best stacked weights into the member modules."""
        with torch.no_grad():
            for name, t in best.items():
                for k, m in enumerate(members):
                    m.get_parameter(name[len("model."):]).copy_(t[k])

    try:
        mse0, f0 = validate()
    except Exception as exc:  # noqa: BLE001 - a vmap limitation; nothing was changed yet
        raise GroupedUnsupported(f"{type(exc).__name__}: {exc}") from exc
    states = [_Progress(config, w, mse0[k]) for k, w in enumerate(warm)]
    initial = [s.loss(mse0[k]) for k, s in enumerate(states)]
    for k, loss in enumerate(initial):
        if not math.isfinite(loss):
            raise TrainingError(f"{descs[k]}: the initial validation loss is {loss}; check the model and the labels")
    histories = [[_history(0, None, initial[k], 1, f0[k], s.lr(0.0), start)] for k, s in enumerate(states)]
    active = np.ones(k_members, dtype=bool)
    last_epoch = [0] * k_members
    reasons = ["max_epochs"] * k_members
    first_step = True

    def diverged(k: int, what: str, epoch: int) -> TrainingDivergedError:
        install()
        for m, c in zip(members, checkpoints):
            if c is not None:
                potentials.save(m, c)
        return _diverged(descs[k], what, epoch, states[k], checkpoints[k])

    bar = tqdm(total=config.epochs, desc=f"{k_members} members", unit="epoch", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, config.epochs + 1):
            ref.train()
            plans = [make_batches(rngs[k], member_idx[k], config, packed.n_atoms) if active[k] else []
                     for k in range(k_members)]
            n_steps = max(len(p) for p in plans)
            total = torch.zeros(k_members, dtype=torch.float64, device=dev)
            bad = torch.zeros(k_members, dtype=torch.bool, device=dev)
            counts = np.zeros(k_members)
            out_of_time = False
            lrs = np.zeros(k_members)
            for step in range(n_steps):
                on = np.array([step < len(p) for p in plans])
                parts = [p[step] if step < len(p) else np.zeros(0, dtype=np.int64) for p in plans]
                lrs = np.array([states[k].lr(epoch - 1 + step / len(plans[k])) if on[k] else lrs[k]
                                for k in range(k_members)])
                host = np.stack([lrs, [s.energy_weight for s in states], on, [len(p) for p in parts]])
                lr_t, ew_t, on_t, n_t = packed._send(host)
                on_t = on_t.bool()
                batch = packed.gather_padded(parts)
                stress = use_stress and any(bool(packed.has_stress[p].any()) for p in parts)
                try:
                    e, f, s = _grouped_forward(base, params, fixed, batch, use_forces, stress, True, shared=False)
                    losses = member_losses(e, f, s, batch, config, ew_t.to(e.dtype))
                    grads = torch.autograd.grad(losses.sum(), plist)
                except Exception as exc:  # noqa: BLE001
                    if first_step:
                        raise GroupedUnsupported(f"{type(exc).__name__}: {exc}") from exc
                    raise
                first_step = False
                with torch.no_grad():
                    norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
                    finite = torch.isfinite(losses) & torch.isfinite(norm)
                    if config.grad_clip is not None:
                        coef = (config.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                        grads = [g * coef.view((-1,) + (1,) * (g.ndim - 1)) for g in grads]
                    bad |= ~finite & on_t
                    optimizer.step(grads, lr_t, on_t)
                    if use_ema:
                        ema_n += on_t
                        decay = torch.minimum(torch.full_like(ema_n, config.ema_decay), (1 + ema_n) / (10 + ema_n))
                        weight = (1 - decay) * on_t
                        for n, p in params.items():
                            shadow[n].lerp_(p, weight.to(p.dtype).view((-1,) + (1,) * (p.ndim - 1)))
                    total += torch.where(on_t, losses.detach().double() * n_t, torch.zeros_like(total))
                counts += np.array([len(p) for p in parts])
                if (step + 1) % READ_EVERY == 0 and bool(bad.any()):
                    k = int(np.flatnonzero(bad.cpu().numpy())[0])
                    raise diverged(k, "a non-finite training loss or gradient norm", epoch)
                if deadline is not None and time.perf_counter() > deadline:
                    out_of_time = True
                    break
            bad_host = bad.cpu().numpy()
            if bad_host.any():
                raise diverged(int(np.flatnonzero(bad_host)[0]), "a non-finite training loss or gradient norm", epoch)
            train_losses = total.cpu().numpy() / np.maximum(counts, 1)
            mse, f_rmse = validate()
            for k in np.flatnonzero(active):
                valid_loss = states[k].loss(mse[k])
                if not math.isfinite(valid_loss):
                    raise diverged(int(k), f"validation loss {valid_loss}", epoch)
                stage = states[k].stage
                improved, final = states[k].end_epoch(epoch, mse[k])
                with torch.no_grad():
                    if improved:
                        for n in best:
                            best[n][k] = shadow[n][k]
                    if final:  # the final stage restarts from the best weights
                        for n in best:
                            params[n][k] = best[n][k]
                            if use_ema:
                                shadow[n][k] = best[n][k]
                histories[k].append(_history(epoch, float(train_losses[k]), valid_loss, stage, f_rmse[k],
                                             float(lrs[k]), start))
                last_epoch[k] = epoch
                if out_of_time:
                    reasons[k], active[k] = "max_time", False
                elif states[k].done:
                    reasons[k], active[k] = states[k].stop_reason, False
            bar.set_postfix(active=int(active.sum()), f_rmse=f"{float(np.mean(f_rmse)):.4f}", refresh=False)
            bar.update(1)
            if not active.any():
                break
    finally:
        bar.close()
    install()
    seconds = time.perf_counter() - start
    results = []
    for k, m in enumerate(members):
        m.eval()
        if checkpoints[k] is not None:
            potentials.save(m, checkpoints[k])
        metrics = _final_metrics(m, cache, {"valid": valid_idx, "test": test_idx}, config)
        result = TrainResult(
            architecture=getattr(m, "architecture", type(m).__name__), n_train=len(member_idx[k]),
            n_valid=len(valid_idx), n_test=len(test_idx), epochs=last_epoch[k], best_epoch=states[k].best_epoch,
            stop_reason=reasons[k], seconds=seconds, warm_start=warm[k], initial_valid_loss=initial[k],
            best_valid_loss=states[k].best_loss, metrics=metrics,
            checkpoint=str(checkpoints[k]) if checkpoints[k] else None,
            metrics_path=str(out_dirs[k] / METRICS_NAME) if out_dirs[k] is not None else None,
            history=tuple(histories[k]),
        )
        if out_dirs[k] is not None:
            _write_json(result.to_dict(), out_dirs[k] / METRICS_NAME)
        results.append(result)
    return results


def members_mode(config: TrainingConfig, members: Sequence[nn.Module], device: torch.device) -> str:
    """``"grouped"`` or ``"sequential"``: ``training.members``, with ``auto`` resolved (module doc)."""
    if config.members != "auto":
        return config.members
    arch = getattr(members[0], "architecture", "")
    grouped = device.type != "cpu" and len(members) > 1 and arch not in SEQUENTIAL_ARCHITECTURES
    return "grouped" if grouped else "sequential"


def _groupable(members: Sequence[nn.Module]) -> bool:
    """Whether the members share architecture, hparams, species, cutoff and tensor shapes (stackable)."""
    ref = members[0]
    shapes = lambda m: [(n, t.shape, t.dtype) for n, t in (*m.named_parameters(), *m.named_buffers())]  # noqa: E731
    return len(members) > 1 and all(
        (m.architecture, m.hparams, m.species, m.cutoff) == (ref.architecture, ref.hparams, ref.species, ref.cutoff)
        and shapes(m) == shapes(ref) for m in members[1:])


def _prepare(model: nn.Module, device: str | torch.device | None, dtype: str | torch.dtype | None) -> torch.device:
    target = resolve_device(device)
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.to(target)
    return target


def _need_split(n_train: int, n_valid: int, hint: str) -> None:
    if n_train < 1 or n_valid < 1:
        raise ValueError(
            f"too few frames: training needs at least 2 labelled frames, at least 1 for training and 1 for "
            f"validation; got {n_train} training and {n_valid} validation frame(s){hint}"
        )


def train_potential(
    model: nn.Module,
    train_frames: Sequence[Atoms],
    valid_frames: Sequence[Atoms],
    config: TrainingConfig,
    *,
    test_frames: Sequence[Atoms] = (),
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    init_from: nn.Module | str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_frames``, early-stopped on ``valid_frames`` (see module doc).

    ``dtype`` (e.g. ``"float64"``) converts the model first; otherwise its own dtype
    is used. With ``out_dir``: ``best.pt`` (best EMA weights, ``potentials.save``) and
    ``metrics.json`` (the result, units in ``UNITS``). On return the model holds the
    best weights, on ``device``, in eval mode.
    """
    if hasattr(model, "members"):
        raise TypeError("train_potential: got a committee; use train_committee to train its members")
    _need_split(len(train_frames), len(valid_frames), "")
    frames = [*train_frames, *valid_frames, *test_frames]
    check_frames(frames, model.species, "dataset")
    target = _prepare(model, device, dtype)
    if init_from is not None:
        warm_start(model, init_from)
    else:
        fit_normalization(model, train_frames)
    cache = GraphCache(frames, model.cutoff, model_dtype(model), target)
    packed = PackedGraphs(cache, model.species_index)
    n_t, n_v = len(train_frames), len(valid_frames)
    return _fit(model, packed, cache, range(n_t), range(n_t, n_t + n_v), range(n_t + n_v, len(frames)), config,
                seed=seed, out_dir=Path(out_dir) if out_dir is not None else None, progress=progress,
                warm=init_from is not None, desc=getattr(model, "architecture", "train"))


def train_committee(
    models: nn.Module | Sequence[nn.Module],
    frames: Sequence[Atoms],
    config: TrainingConfig,
    *,
    bootstrap: bool = False,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    init_from: nn.Module | Sequence[nn.Module] | str | os.PathLike | None = None,
    stable_split: bool = False,
    replay: Sequence[Atoms] = (),
    replay_weight: float = 1.0,
) -> CommitteeTrainResult:
    """Train every member (a ``Committee``'s ``members`` or a list of potentials), together or one after another.

    ``config.members`` picks the path (module doc; ``extra["members_mode"]`` records it).

    One train/valid/test split of ``frames`` by ``seed`` (``alflow.data.split`` with
    ``config.valid_fraction`` and ``config.test_fraction``; ``stable_split``:
    ``alflow.data.stable_split``, where a frame keeps its part as the dataset grows, for
    warm-started retraining) is shared; member k trains
    with seed ``seed + k`` (batch order) and, with ``bootstrap``, on a resample with
    replacement of the training frames of the same size; a fresh member's E0/scale/shift
    are fitted on its own training frames. ``init_from``: a committee
    with as many members (member k warm-starts from member k), or one potential that
    every member starts from. ``replay`` (alflow.foundation): extra labelled frames that join every
    member's training set only (never the split), each floor(w) or ceil(w) times for ``replay_weight``
    w (drawn per member; an expected loss share of w). With ``out_dir``: ``member_<k>/`` (best.pt, metrics.json),
    ``metrics.json`` (this result) and, for a Committee, ``committee.pt``.
    """
    from alflow.data import split, stable_split as split_by_content

    if getattr(models, "committee_kind", "full") == "shallow":  # one trunk, K heads: alflow/train_shallow.py
        from alflow.train_shallow import train_shallow

        return train_shallow(models, frames, config, device=device, dtype=dtype, seed=seed, out_dir=out_dir,
                             progress=progress, init_from=init_from, stable_split=stable_split)
    members = members_of(models) if isinstance(models, nn.Module) else list(models)
    if not members:
        raise ValueError("models: expected at least one potential, got none")
    cutoffs = {float(m.cutoff) for m in members}
    if len(cutoffs) != 1:
        raise ValueError(f"models: members have different cutoffs {sorted(cutoffs)}; expected one")
    if len(frames) < 2:
        _need_split(len(frames), 0, "")
    if config.valid_fraction == 0:
        raise ValueError("training.valid_fraction is 0: early stopping needs at least 1 validation frame")
    n_labelled = len(frames)
    frames = [*frames, *replay]  # the split below covers the first n_labelled only
    check_frames(frames, sorted({z for m in members for z in m.species}), "dataset")
    sources: list[Any] = [None] * len(members)
    if init_from is not None:
        init = _as_model(init_from)
        previous = members_of(init) if isinstance(init, nn.Module) else list(init)
        if len(previous) not in (1, len(members)):
            raise ValueError(f"init_from: {len(previous)} previous members for {len(members)} members")
        sources = previous * len(members) if len(previous) == 1 else previous
    fractions = (1.0 - config.valid_fraction - config.test_fraction, config.valid_fraction, config.test_fraction)
    if stable_split:
        train_idx, valid_idx, test_idx = split_by_content(frames[:n_labelled], fractions, seed)
    else:
        train_idx, valid_idx, test_idx = split(n_labelled, fractions, seed)
    _need_split(len(train_idx), len(valid_idx), "")
    start = time.perf_counter()
    if isinstance(models, nn.Module):
        target = _prepare(models, device, dtype)  # a Committee: its own buffers move too
    else:
        for m in members:
            target = _prepare(m, device, dtype)
    cache = GraphCache(frames, cutoffs.pop(), model_dtype(members[0]), target)
    packs: dict[tuple[int, ...], PackedGraphs] = {}  # one per species list (members of a list may differ)
    for m in members:
        if tuple(m.species) not in packs:
            packs[tuple(m.species)] = PackedGraphs(cache, m.species_index)
    out = Path(out_dir) if out_dir is not None else None
    member_idx, warm = [], []
    for k, (member, source) in enumerate(zip(members, sources)):
        rng = np.random.default_rng([seed, k])
        idx = np.sort(rng.choice(train_idx, size=len(train_idx), replace=True)) if bootstrap else np.asarray(train_idx)
        if len(replay):
            times = math.floor(replay_weight) + (rng.random(len(replay)) < replay_weight - math.floor(replay_weight))
            idx = np.concatenate([idx, np.repeat(np.arange(n_labelled, len(frames)), times)]).astype(np.int64)
        if source is not None:
            warm_start(member, source)
        else:
            fit_normalization(member, [frames[i] for i in idx])
        member_idx.append(idx)
        warm.append(source is not None)
    out_dirs = [out / f"member_{k}" if out is not None else None for k in range(len(members))]
    mode = members_mode(config, members, target)
    if mode == "grouped" and not _groupable(members):
        mode = "sequential"
    results: list[TrainResult] = []
    if mode == "grouped":
        try:
            results = _fit_grouped(members, packs[tuple(members[0].species)], cache, member_idx, valid_idx, test_idx,
                                   config, seeds=[seed + k for k in range(len(members))], out_dirs=out_dirs,
                                   progress=progress, warm=warm)
        except GroupedUnsupported as exc:
            import warnings

            warnings.warn(f"training.members: the members of architecture {members[0].architecture!r} cannot be "
                          f"trained together ({exc}); training them one after another", RuntimeWarning, stacklevel=2)
            mode = "sequential"
    if mode == "sequential":
        for k, member in enumerate(members):
            results.append(_fit(member, packs[tuple(member.species)], cache, member_idx[k], valid_idx, test_idx, config,
                                seed=seed + k, out_dir=out_dirs[k], progress=progress, warm=warm[k],
                                desc=f"member {k + 1}/{len(members)}"))
    evaluators = [models] if isinstance(models, nn.Module) and hasattr(models, "members") else members
    metrics = {name: public(evaluate_cached(evaluators, cache, idx, config.batch_size))
               for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", test_idx)) if len(idx)}
    checkpoint = None
    if out is not None and isinstance(models, nn.Module) and hasattr(models, "members"):
        import potentials

        checkpoint = str(potentials.save(models, out / "committee.pt"))
    result = CommitteeTrainResult(
        members=tuple(results), train_idx=tuple(int(i) for i in train_idx), valid_idx=tuple(int(i) for i in valid_idx),
        test_idx=tuple(int(i) for i in test_idx), bootstrap=bootstrap, seconds=time.perf_counter() - start,
        metrics=metrics, checkpoint=checkpoint, metrics_path=str(out / METRICS_NAME) if out is not None else None,
        extra={"members_mode": mode, "device": str(target), "epochs": sum(r.epochs for r in results)},
    )
    if out is not None:
        _write_json(result.to_dict(), out / METRICS_NAME)
    return result
