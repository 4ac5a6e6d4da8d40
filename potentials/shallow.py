"""A shallow committee: one shared trunk and K readout heads (Kellner & Ceriotti, MLST 2024).

Any architecture whose class names its readout (``Potential.readout_module``, the submodule
that turns per-atom features x_i (N, F) into the unit-less per-atom output (N, 1), entering
``atomic_energies`` additively and once per call) can be split there. The readout is replaced
by K copies, the heads h_k, initialised differently; the trunk (everything before) is shared:

    E_i^k = E_i^mean + scale · (h_k(x_i) - h̄(x_i)),   h̄ = (1/K) Σ_k h_k     (eV)
    E^k   = Σ_i E_i^k                                                      (eV)

where E_i^mean is the architecture's own per-atom energy with the readout output replaced by
h̄ (so shift, E0 and any Coulomb term are shared by every head).

Forces, ``forces`` (``ShallowCommittee.forces_mode``):

* ``"heads"`` (default): every head's forces F^k = -dE^k/dr, exact: on an accelerator from one
  batched vector-Jacobian product (``autograd.grad(..., is_grads_batched=True)``: K cotangents
  through the trunk's backward at once), on the CPU from K backward passes over one forward pass
  (measured faster there: SchNet, 108/864 atoms, 1 thread: 2.3×/3.0× one model vs 4.2×/6.8× batched). ``forces_comm`` (K, N, 3) are the heads' forces, the mean
  force is their mean, and the scores are the Committee's (DP-GEN's eps_i) unchanged.
  ``forward(..., spread=False)`` skips the K passes: mean forces at the cost of one model, NaN
  deviations; the batched MD engine uses it on the steps that record no frame, so exploration
  pays for the spread only where it is read.
* ``"mean"``: one backward pass of the mean energy only (the cost of one model). The mean
  force is exact; ``forces_comm`` holds K copies of it, and the force deviation is the
  per-atom ENERGY spread: eps_i = α · std_k(E_i^k) / (1 Å), in eV/Å only after calibration
  (α then carries 1/Å). ``forces_var`` is eps_i²/3 per component.

Outputs otherwise as ``potentials.committee.Committee`` (same keys, population statistics
scaled by α; ``calibrated=False`` uses α = 1), so the ASE calculator, the batched engine,
the i-PI driver and selection use either kind unchanged. Checkpoints are weights only
(``kind: "shallow"``; ``potentials.load`` dispatches on it).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
from torch import nn

from alflow import keys
from alflow.neighbors import edge_vectors
from potentials import registry
from potentials.base import Potential, strained_geometry
from potentials.committee import FORCE_DEVIATION, Committee

FORCES_MODES = ("heads", "mean")


def readout_name(model: Potential) -> str:
    """The model's readout submodule name; an architecture without one is an error naming it."""
    name = getattr(type(model), "readout_module", None)
    if not name:
        supported = ", ".join(n for n in registry.available() if getattr(registry.get_class(n), "readout_module", None))
        raise ValueError(f"committee.kind shallow: architecture {model.architecture!r} declares no readout "
                         f"(Potential.readout_module); shallow committees support: {supported}")
    return name


def supported() -> list[str]:
    """Registry names of the architectures that declare a readout (usable as shallow committees)."""
    return [n for n in registry.available() if getattr(registry.get_class(n), "readout_module", None)]


def _reinit(module: nn.Module) -> None:
    for sub in module.modules():
        if sub is not module and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


class Heads(nn.Module):
    """K readouts on the same features; returns their mean and keeps every head's output for the caller."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.capture = False  # set by ShallowCommittee.head_energies for one call
        self.outputs: torch.Tensor | None = None  # (K, N, 1) of that call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([h(x) for h in self.heads])
        if self.capture:  # only while captured: a stored graph would block deepcopy (EMA) and hold memory
            self.outputs = out
            self.calls += 1
        return out.mean(0)


class ShallowCommittee(nn.Module):
    """One trunk, K heads at the readout (module docstring); α calibrates the spread."""

    committee_kind: str = "shallow"  # alflow.train.train_committee dispatches on it
    # forward(spread=False) gives the mean forces at one model's cost (NaN deviations): both MD engines
    # (alflow.explore.batched, alflow.explore.ase_md) ask for the heads' spread only on steps that record a frame
    sparse_spread: bool = True

    def __init__(self, model: Potential, k: int, *, seed: int = 0, alpha: float = 1.0, init: str = "random",
                 forces_mode: str = "heads") -> None:
        """Split ``model`` (taken over, not copied) at its readout into ``k`` heads.

        ``init``: ``"random"`` re-initialises every head (seed + k); ``"perturb"`` keeps the trained
        readout in each head and adds Gaussian noise of 0.1 × each weight tensor's RMS (head 0 unchanged);
        ``"copy"`` keeps K identical copies (a checkpoint being loaded overwrites them anyway).
        """
        super().__init__()
        if not isinstance(model, Potential):
            raise ValueError(f"model: expected a Potential, got {type(model).__name__}")
        if int(k) < 2 or int(k) > registry.MAX_MEMBERS:
            raise ValueError(f"committee.heads: expected 2 to {registry.MAX_MEMBERS} heads, got {k!r}")
        if forces_mode not in FORCES_MODES:
            raise ValueError(f"forces_mode: expected one of {', '.join(FORCES_MODES)}, got {forces_mode!r}")
        if init not in ("random", "perturb", "copy"):
            raise ValueError(f"init: expected 'random', 'perturb' or 'copy', got {init!r}")
        name = readout_name(model)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        readout = getattr(parent, attr)
        if isinstance(readout, Heads):
            raise ValueError("model: already split into heads")
        heads = []
        for i in range(int(k)):
            head = copy.deepcopy(readout)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(int(seed) + i)
                if init == "random":
                    _reinit(head)
                elif init == "perturb" and i > 0:
                    for p in head.parameters():
                        p.add_(0.1 * p.pow(2).mean().sqrt() * torch.randn_like(p))
            heads.append(head)
        setattr(parent, attr, Heads(heads))
        self.model = model
        self.readout_path = name
        self.architecture: str = model.architecture
        self.species: list[int] = list(model.species)
        self.cutoff: float = model.cutoff
        self.hparams: dict[str, Any] = dict(model.hparams)
        self.implemented_properties = model.implemented_properties
        self.forces_mode = forces_mode
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        self.register_buffer("alpha", torch.tensor(1.0, dtype=dtype, device=model.e0.device))
        self.set_alpha(alpha)
        self.batched_vjp: bool | str = "auto"  # heads mode: True batched VJP, False K passes, "auto" by device
        self._batched_ok = True
        self.train(model.training)

    # ------------------------------------------------------------------ basics

    @property
    def heads(self) -> Heads:
        return self.model.get_submodule(self.readout_path)

    @property
    def n_members(self) -> int:
        return len(self.heads.heads)

    def set_alpha(self, alpha: float) -> None:
        """Set the calibration factor α > 0 (variances scale by α², deviations by α)."""
        value = float(alpha)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"alpha: expected a positive finite calibration factor, got {alpha!r}")
        self.alpha.fill_(value)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.model.species_index(numbers)

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The shared parameters (everything but the heads)."""
        head_ids = {id(p) for p in self.heads.parameters()}
        return [p for p in self.model.parameters() if id(p) not in head_ids]

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture!r}, heads={self.n_members}, forces_mode={self.forces_mode!r}, "
                f"alpha={float(self.alpha):.4g}")

    # ------------------------------------------------------------------ evaluation

    def head_energies(self, batch: dict[str, torch.Tensor], forces: bool, stress: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-head energies (K, B) and node energies (K, N), and the leaves (positions, displacement)."""
        leaf, cell, displacement, positions = strained_geometry(batch, forces, stress)
        idx = batch[keys.EDGE_INDEX]
        vectors = edge_vectors(positions, cell, idx[0], idx[1], batch[keys.SHIFTS], batch[keys.BATCH])
        species = self.model.species_index(batch[keys.NUMBERS])
        inner = dict(batch)
        inner[keys.POSITIONS], inner[keys.CELL] = positions, cell
        heads = self.heads
        heads.calls, heads.outputs, heads.capture = 0, None, True
        try:
            node_mean = self.model.node_energies(inner, vectors, species)
        finally:
            outputs, heads.outputs, heads.capture = heads.outputs, None, False
        if heads.calls != 1 or outputs is None or outputs[0].numel() != node_mean.numel():
            raise RuntimeError(f"shallow committee: the readout {self.readout_path!r} of {self.architecture!r} was "
                               f"called {heads.calls} times per evaluation; expected once with one output per atom")
        h = outputs.reshape(outputs.shape[0], -1)  # (K, N)
        nodes = node_mean.unsqueeze(0) + self.model.scale * (h - h.mean(0, keepdim=True))
        n_structures = batch[keys.CELL].shape[0]
        energies = torch.zeros((h.shape[0], n_structures), dtype=nodes.dtype, device=nodes.device)
        energies = energies.index_add(1, batch[keys.BATCH], nodes)
        return energies, nodes, leaf, displacement

    def _head_grads(self, energies: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
        """d(Σ_b E_b^k)/d(input) for every head k: (K, *input.shape) each, one batched VJP (loop as fallback)."""
        k = energies.shape[0]
        batched = self.batched_vjp is True or (self.batched_vjp == "auto" and energies.device.type != "cpu")
        if batched and self._batched_ok:  # "auto": on the CPU K backward passes measured faster
            eye = torch.eye(k, dtype=energies.dtype, device=energies.device)
            cot = eye[:, :, None].expand(k, k, energies.shape[1])
            try:
                grads = torch.autograd.grad(energies, inputs, grad_outputs=cot, is_grads_batched=True,
                                            create_graph=create_graph, allow_unused=True, retain_graph=True)
                return [g if g is not None else torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)
                        for g, x in zip(grads, inputs)]
            except RuntimeError:  # an op without a batching rule for its backward: K passes below
                self._batched_ok = False
        per = []
        for i in range(k):
            g = torch.autograd.grad(energies[i].sum(), inputs, create_graph=create_graph, allow_unused=True,
                                    retain_graph=True)
            per.append([gi if gi is not None else torch.zeros_like(x) for gi, x in zip(g, inputs)])
        return [torch.stack([p[j] for p in per]) for j in range(len(inputs))]

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        forces: bool = True,
        stress: bool = False,
        create_graph: bool | None = None,
        calibrated: bool = True,
        spread: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Means, heads' predictions and scores, as ``Committee.forward`` (module docstring for ``forces_mode``).

        ``spread=False`` (``forces_mode: heads``): the mean forces from one backward pass (the cost of one
        model) and NaN force deviations, for MD steps whose deviation nobody reads (``sparse_spread``).
        """
        create_graph = self.training if create_graph is None else bool(create_graph)
        alpha = self.alpha if calibrated else torch.ones_like(self.alpha)
        with torch.enable_grad() if (forces or stress) else contextlib.nullcontext():
            energies, nodes, leaf, displacement = self.head_energies(batch, forces, stress)
            inputs = ([leaf] if forces or stress else []) + ([displacement] if stress else [])
            if not inputs:
                return Committee._scores(batch, energies, nodes, None, None, alpha)
            if self.forces_mode == "heads" and spread:
                grads = self._head_grads(energies, inputs, create_graph)
                grad_r = grads[0]
                grad_eps = grads[1] if stress else None
                return Committee._scores(batch, energies, nodes, grad_r if forces else None, grad_eps, alpha)
            g = torch.autograd.grad(energies.mean(0).sum(), inputs, create_graph=create_graph, allow_unused=True)
            g = [gi if gi is not None else torch.zeros_like(x) for gi, x in zip(g, inputs)]
        k = energies.shape[0]
        grad_eps = g[1].unsqueeze(0).expand(k, *g[1].shape) if stress else None
        out = Committee._scores(batch, energies, nodes, None, grad_eps, alpha)
        if forces:
            a = alpha.to(nodes.dtype)
            eps = a * nodes.std(0, correction=0)  # per-atom energy spread, eV (per Å after calibration)
            if self.forces_mode == "heads":  # spread=False: the heads' force spread was not computed
                eps = torch.full_like(eps, math.nan)
            mean_forces = -g[0]
            max_eps = torch.zeros(energies.shape[1], dtype=eps.dtype, device=eps.device).scatter_reduce(
                0, batch[keys.BATCH], eps, reduce="amax", include_self=True)
            out.update({
                keys.FORCES: mean_forces,
                keys.FORCES_COMM: mean_forces.unsqueeze(0).expand(k, -1, -1),
                keys.FORCES_VAR: (eps**2 / 3.0)[:, None].expand(-1, 3),
                FORCE_DEVIATION: eps,
                keys.MAX_FORCE_DEVIATION: max_eps,
            })
        return out

    @classmethod
    def build(cls, name: str, k: int, species: list[int | str], cutoff: float, seed: int = 0,
              forces_mode: str = "heads", **hparams: Any) -> ShallowCommittee:
        """A fresh trunk of architecture ``name`` (seeded with ``seed``) split into ``k`` random heads."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = registry.build(name, list(species), cutoff, **hparams)
        return cls(model, k, seed=seed, forces_mode=forces_mode)

    # ------------------------------------------------------------------ checkpoints

    def trunk_metadata(self) -> dict[str, Any]:
        return registry.metadata(self.model)

    def checkpoint(self) -> dict[str, Any]:
        """Weights-only payload for ``potentials.save``: the trunk's metadata, K, α, forces mode and state dict."""
        return {
            "kind": "shallow",
            "metadata": {"model": registry.metadata(self.model), "heads": self.n_members,
                         "alpha": float(self.alpha), "forces_mode": self.forces_mode},
            "state_dict": self.state_dict(),
        }

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], where: str = "checkpoint") -> ShallowCommittee:
        """Rebuild from :meth:`checkpoint`'s payload: the trunk with head 0 as its readout is built and checked
        against the stored weights (``registry.model_from_checkpoint``), then split into K heads and loaded."""
        meta, state = payload["metadata"], payload["state_dict"]
        if not isinstance(meta, dict):
            raise registry.CheckpointError(f"{where}: metadata must be a mapping")
        k = meta.get("heads")
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= registry.MAX_MEMBERS:
            raise registry.CheckpointError(f"{where}: metadata.heads = {k!r}; expected an integer in 2..{registry.MAX_MEMBERS}")
        alpha = meta.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise registry.CheckpointError(f"{where}: metadata.alpha = {alpha!r}; expected a positive finite number")
        mode = meta.get("forces_mode", "heads")
        if mode not in FORCES_MODES:
            raise registry.CheckpointError(f"{where}: metadata.forces_mode = {mode!r}; expected one of {FORCES_MODES}")
        registry.check_metadata(meta.get("model"), f"{where}: model")
        name = getattr(registry.get_class(meta["model"]["architecture"]), "readout_module", None)
        if not name:
            raise registry.CheckpointError(f"{where}: architecture {meta['model']['architecture']!r} has no readout")
        head0 = f"model.{name}.heads.0."
        heads_prefix = f"model.{name}.heads."
        trunk = {}
        for key, t in state.items():
            if key.startswith(head0):
                trunk[f"{name}.{key[len(head0):]}"] = t
            elif key.startswith("model.") and not key.startswith(heads_prefix):
                trunk[key[len("model."):]] = t
        model = registry.model_from_checkpoint({"metadata": meta["model"], "state_dict": trunk}, f"{where}: model")
        committee = cls(model, k, alpha=float(alpha), init="copy", forces_mode=mode)
        try:
            committee.load_state_dict(state)
        except RuntimeError as exc:
            raise registry.CheckpointError(f"{where}: the stored weights do not match {k} heads ({str(exc)[:300]})") from exc
        return committee
