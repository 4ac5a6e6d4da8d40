"""A committee (ensemble) of K potentials of one architecture, evaluated in one batched pass.

The K members' parameters and buffers are stacked (``torch.func.stack_module_state``
layout) and one member's per-atom energy function is mapped over them with
``torch.vmap`` + ``torch.func.functional_call``. Each member sees its own copy of the
positions, (K, N, 3), and of the strain, (K, B, 3, 3), both leaves of the graph, so a
single ``autograd.grad`` of Σ_k Σ_b E_b^k yields every member's forces and stress:

    F^k = -dE^k/dr^k            σ^k = (1/V) dE^k/dε^k            (see potentials/base.py)

Outputs per structure (alflow.keys): the committee means ``energy`` (B,), ``forces``
(N, 3), ``stress`` (B, 3, 3); the members' ``energies`` (K, B), ``forces_comm``
(K, N, 3), ``stress_comm`` (K, B, 3, 3); and the scores of ``alflow.committee``, with
population statistics (ddof = 0) scaled by the calibration factor α: ``energy_var``
(B,), ``forces_var`` (N, 3), ``force_deviation`` (N,) (DP-GEN's eps_i),
``max_force_deviation`` (B,) and ``energy_deviation_per_atom`` (B,).

An architecture whose per-atom energies cannot be vmapped (data-dependent Python
control flow, ``.item()``, in-place writes into unbatched tensors, ...) falls back to
K sequential member calls, with one warning. On the CPU the sequential path is the
default (``vectorize="auto"``): it measured faster there (see Committee).
"""

from __future__ import annotations

import math

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from alflow import keys
from alflow.neighbors import edge_vectors
from potentials import registry
from potentials.base import Potential, compute_properties

FORCE_DEVIATION = "force_deviation"


class _NodeEnergies(nn.Module):
    """Exposes ``model.node_energies`` as ``forward`` so that ``functional_call`` can swap its tensors."""

    def __init__(self, model: Potential) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        return self.model.node_energies(batch, vectors, species)


def _strain(
    positions: torch.Tensor, cell: torch.Tensor, displacement: torch.Tensor, batch_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """r' = r (1 + sym ε), cell' = cell (1 + sym ε) for one member (as ``potentials.base.strained_geometry``)."""
    symmetric = 0.5 * (displacement + displacement.transpose(-1, -2))
    positions = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch_index])
    cell = cell + torch.bmm(cell, symmetric)
    return positions, cell


def _check_members(members: Sequence[Potential]) -> None:
    if not isinstance(members, (list, tuple, nn.ModuleList)) or len(members) == 0:
        raise ValueError("members: expected a non-empty list of Potential instances")
    ref = members[0]
    for k, m in enumerate(members):
        if not isinstance(m, Potential):
            raise ValueError(f"members[{k}]: expected a Potential, got {type(m).__name__}")
        if k == 0:
            continue
        for what, value, expected in (
            ("architecture", m.architecture, ref.architecture),
            ("species", m.species, ref.species),
            ("cutoff", m.cutoff, ref.cutoff),
            ("hparams", m.hparams, ref.hparams),
        ):
            if value != expected:
                raise ValueError(f"members[{k}]: {what} {value!r} differs from members[0]'s {expected!r}")
        shapes = {n: (t.shape, t.dtype, t.device) for n, t in (*m.named_parameters(), *m.named_buffers())}
        ref_shapes = {n: (t.shape, t.dtype, t.device) for n, t in (*ref.named_parameters(), *ref.named_buffers())}
        if shapes != ref_shapes:
            diff = sorted(set(shapes.items()) ^ set(ref_shapes.items()), key=str)[:3]
            raise ValueError(f"members[{k}]: tensors differ from members[0]'s in name, shape, dtype or device: {diff}")


class Committee(nn.Module):
    """K potentials of one architecture, species, cutoff and hyperparameters; α calibrates the spread.

    ``vectorize``: True — the batched vmap pass; False — K sequential member calls; "auto"
    (default) — the batched pass on an accelerator, the loop on the CPU, where it measured
    faster with 1 and 2 threads on an idle machine (the K-fold larger tensors of the batched
    pass fall out of cache, and vmap's batched bmm/elementwise kernels are slower than the
    per-member ones: SchNet, K = 4, 2 threads, vmap 5.6–8.0× one model vs the loop's
    4.1–4.5×; ``benchmarks/committee.py``). Both paths give the same numbers (to float rounding).
    """

    def __init__(
        self, members: Sequence[Potential], alpha: float = 1.0, *, vectorize: bool | str = "auto"
    ) -> None:
        super().__init__()
        _check_members(members)
        self.members = nn.ModuleList(members)
        ref = self.members[0]
        self.architecture: str = ref.architecture
        self.species: list[int] = list(ref.species)
        self.cutoff: float = ref.cutoff
        self.hparams: dict[str, Any] = dict(ref.hparams)
        self.implemented_properties = ref.implemented_properties
        dtype = next((p.dtype for p in ref.parameters() if p.is_floating_point()), torch.get_default_dtype())
        self.register_buffer("alpha", torch.tensor(1.0, dtype=dtype, device=ref.e0.device))
        self.set_alpha(alpha)
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize: expected True, False or 'auto', got {vectorize!r}")
        self.vectorize = vectorize
        self._vmap_error: str | None = None  # set once vmap has failed for this architecture
        self._stack_key: tuple | None = None
        self._stack: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self._slots: tuple | None = None
        self.train(ref.training)  # a committee of eval-mode members starts in eval mode

    # ------------------------------------------------------------------ basics

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def vectorized(self) -> bool:
        """Whether forward uses the vmapped path now (never once vmap has failed for this architecture)."""
        if self._vmap_error is not None:
            return False
        if self.vectorize == "auto":
            return self.alpha.device.type != "cpu"
        return bool(self.vectorize)

    def set_alpha(self, alpha: float) -> None:
        """Set the calibration factor α > 0 (variances scale by α², deviations by α)."""
        value = float(alpha)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"alpha: expected a positive finite calibration factor, got {alpha!r}")
        self.alpha.fill_(value)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """As :meth:`Potential.species_index`: an unknown element raises UnknownElementError naming it."""
        return self.members[0].species_index(numbers)

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, n_members={self.n_members}, alpha={float(self.alpha):.4g}"

    # ------------------------------------------------------------------ stacked parameters

    def _tensors(self) -> tuple[list[str], list[str], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Parameter and buffer names, and each member's current tensors in that order.

        The owners of the tensors are looked up once (``named_parameters`` is slow on deep
        modules); each call re-reads the owners' ``_parameters``/``_buffers`` dicts, so a
        replaced parameter (``load_state_dict(assign=True)``) is still seen.
        """
        if self._slots is None:
            pnames = [n for n, _ in self.members[0].named_parameters()]
            bnames = [n for n, _ in self.members[0].named_buffers()]
            slots = []
            for m in self.members:
                owners = []
                for table, names in (("_parameters", pnames), ("_buffers", bnames)):
                    for name in names:
                        path, _, attr = name.rpartition(".")
                        owners.append((getattr(m.get_submodule(path), table), attr))
                slots.append(owners)
            self._slots = (pnames, bnames, slots)
        pnames, bnames, slots = self._slots
        n_p = len(pnames)
        try:
            tensors = [[table[attr] for table, attr in owners] for owners in slots]
        except KeyError:  # the module structure changed: look the owners up again
            self._slots = None
            return self._tensors()
        return pnames, bnames, [t[:n_p] for t in tensors], [t[n_p:] for t in tensors]

    def stacked_state(self, differentiable: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Members' parameters and buffers stacked along a new first axis (K, ...), keyed ``model.<name>``.

        Non-differentiable stacks are cached and rebuilt only when a member tensor changed
        (its storage or its in-place version counter: optimizer steps, ``load_state_dict``,
        ``.to()``); ``differentiable=True`` restacks every call so gradients reach the members.
        """
        pnames, bnames, params, buffers = self._tensors()
        if differentiable:
            return (
                {f"model.{n}": torch.stack([ps[i] for ps in params]) for i, n in enumerate(pnames)},
                {f"model.{n}": torch.stack([bs[i] for bs in buffers]) for i, n in enumerate(bnames)},
            )
        try:
            key = tuple((t._version, t.data_ptr()) for ts in (*params, *buffers) for t in ts)
        except RuntimeError:  # inference tensors carry no version counter: restack every call
            key = None
        if key is None or key != self._stack_key or self._stack is None:
            with torch.no_grad():
                self._stack = (
                    {f"model.{n}": torch.stack([ps[i].detach() for ps in params]) for i, n in enumerate(pnames)},
                    {f"model.{n}": torch.stack([bs[i].detach() for bs in buffers]) for i, n in enumerate(bnames)},
                )
            self._stack_key = key
        return self._stack

    def _apply(self, fn, recurse=True):  # .to()/.double()/.cuda(): drop the cached stack
        self._stack, self._stack_key, self._slots = None, None, None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ evaluation

    def _vmapped(
        self,
        batch: dict[str, torch.Tensor],
        species: torch.Tensor,
        forces: bool,
        stress: bool,
        create_graph: bool,
        differentiable: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """energies (K, B), node energies (K, N), dE/dr (K, N, 3), dE/dε (K, B, 3, 3) in one vmapped pass."""
        k = self.n_members
        params, buffers = self.stacked_state(differentiable=differentiable)
        base = _NodeEnergies(self.members[0])
        cell0, batch_index, shifts = batch[keys.CELL], batch[keys.BATCH], batch[keys.SHIFTS]
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        n_structures = cell0.shape[0]

        def member_energy(p, b, positions, displacement):
            cell = cell0
            if displacement is not None:
                positions, cell = _strain(positions, cell0, displacement, batch_index)
            vectors = edge_vectors(positions, cell, idx_i, idx_j, shifts, batch_index)
            inner = dict(batch)
            inner[keys.POSITIONS], inner[keys.CELL] = positions, cell
            node = functional_call(base, (p, b), (inner, vectors, species))
            energy = torch.zeros(n_structures, dtype=node.dtype, device=node.device).index_add(0, batch_index, node)
            return energy, node

        positions = batch[keys.POSITIONS].detach()
        if forces or stress:
            positions = positions.unsqueeze(0).expand(k, -1, -1).clone().requires_grad_(True)
            pos_dim = 0
        else:
            pos_dim = None
        displacement = None
        if stress:
            displacement = torch.zeros((k, *cell0.shape), dtype=cell0.dtype, device=cell0.device, requires_grad=True)
        # randomness="different": a member with dropout (training) draws its own mask, as when called alone
        in_dims = (0, 0, pos_dim, 0 if stress else None)
        mapped = torch.vmap(member_energy, in_dims=in_dims, randomness="different")
        energies, nodes = mapped(params, buffers, positions, displacement)
        grad_r = grad_eps = None
        if forces or stress:
            inputs = [positions] + ([displacement] if stress else [])
            grads = torch.autograd.grad(energies.sum(), inputs, create_graph=create_graph, allow_unused=True)
            grad_r = grads[0] if grads[0] is not None else torch.zeros_like(positions)
            if stress:
                grad_eps = grads[1] if grads[1] is not None else torch.zeros_like(displacement)
        return energies, nodes, grad_r, grad_eps

    def _sequential(
        self, batch: dict[str, torch.Tensor], forces: bool, stress: bool, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        outs = [compute_properties(m, batch, forces=forces, stress=stress, create_graph=create_graph) for m in self.members]
        energies = torch.stack([o[keys.ENERGY] for o in outs])
        nodes = torch.stack([o[keys.NODE_ENERGY] for o in outs])
        grad_r = -torch.stack([o[keys.FORCES] for o in outs]) if forces else None
        grad_eps = None
        if stress:
            volume = torch.linalg.det(batch[keys.CELL]).abs().clamp_min(1e-12)
            grad_eps = torch.stack([o[keys.STRESS] for o in outs]) * volume[:, None, None]
        return energies, nodes, grad_r, grad_eps

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        forces: bool = True,
        stress: bool = False,
        create_graph: bool | None = None,
        calibrated: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Committee means, members' predictions and scores (module docstring); ``calibrated=False`` uses α = 1."""
        create_graph = self.training if create_graph is None else bool(create_graph)
        differentiable = create_graph or (self.training and torch.is_grad_enabled())
        species = self.species_index(batch[keys.NUMBERS])  # unknown elements: an error, on either path
        with torch.enable_grad() if (forces or stress) else contextlib.nullcontext():
            if not self.vectorized:
                result = self._sequential(batch, forces, stress, create_graph)
            else:
                try:
                    result = self._vmapped(batch, species, forces, stress, create_graph, differentiable)
                except Exception as exc:  # noqa: BLE001 - a vmap limitation, unless the loop fails too
                    result = self._sequential(batch, forces, stress, create_graph)  # a real error re-raises here
                    self._vmap_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(
                        f"Committee: torch.vmap cannot evaluate architecture {self.architecture!r} "
                        f"({self._vmap_error}); falling back to {self.n_members} sequential member calls",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        energies, nodes, grad_r, grad_eps = result
        alpha = self.alpha if calibrated else torch.ones_like(self.alpha)
        return self._scores(batch, energies, nodes, grad_r, grad_eps, alpha)

    @staticmethod
    def _scores(
        batch: dict[str, torch.Tensor],
        energies: torch.Tensor,
        nodes: torch.Tensor,
        grad_r: torch.Tensor | None,
        grad_eps: torch.Tensor | None,
        alpha: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        alpha = alpha.to(energies.dtype)
        n_atoms = batch[keys.N_ATOMS].to(energies.dtype)
        e_var = alpha**2 * energies.var(dim=0, correction=0)
        out = {
            keys.ENERGY: energies.mean(0),
            keys.NODE_ENERGY: nodes.mean(0),
            keys.ENERGIES: energies,
            keys.ENERGY_VAR: e_var,
            keys.ENERGY_DEVIATION_PER_ATOM: e_var.sqrt() / n_atoms.clamp_min(1),
        }
        if grad_r is not None:
            forces_comm = -grad_r
            f_var = alpha**2 * forces_comm.var(dim=0, correction=0)
            eps = f_var.sum(-1).sqrt()
            n_structures = energies.shape[1]
            max_eps = torch.zeros(n_structures, dtype=eps.dtype, device=eps.device).scatter_reduce(
                0, batch[keys.BATCH], eps, reduce="amax", include_self=True
            )
            out.update({
                keys.FORCES: forces_comm.mean(0),
                keys.FORCES_COMM: forces_comm,
                keys.FORCES_VAR: f_var,
                FORCE_DEVIATION: eps,
                keys.MAX_FORCE_DEVIATION: max_eps,
            })
        if grad_eps is not None:
            volume = torch.linalg.det(batch[keys.CELL]).abs().clamp_min(1e-12)
            stress_comm = grad_eps / volume[None, :, None, None]
            out.update({keys.STRESS: stress_comm.mean(0), keys.STRESS_COMM: stress_comm})
        return out

    # ------------------------------------------------------------------ construction and checkpoints

    @classmethod
    def build(
        cls, name: str, k: int, species: Sequence[int | str], cutoff: float, seed: int = 0, **hparams: Any
    ) -> Committee:
        """K freshly initialised members of architecture ``name``, member i seeded with ``seed + i``."""
        if int(k) < 1:
            raise ValueError(f"k: expected at least one committee member, got {k!r}")
        members = []
        for i in range(int(k)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed) + i)
                members.append(registry.build(name, list(species), cutoff, **hparams))
        return cls(members)

    def checkpoint(self) -> dict[str, Any]:
        """Weights-only payload for ``potentials.save``: members' metadata, α and the state dict."""
        return {
            "kind": "committee",
            "metadata": {"members": [registry.metadata(m) for m in self.members], "alpha": float(self.alpha)},
            "state_dict": self.state_dict(),
        }

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], where: str = "checkpoint") -> Committee:
        """Rebuild a committee from :meth:`checkpoint`'s payload (metadata already parsed).

        The member count is bounded (``registry.MAX_MEMBERS``) and each member's metadata is checked
        against its stored weights before it is built (``registry.model_from_checkpoint``);
        ``CheckpointError`` names ``where`` and the member.
        """
        meta, state = payload["metadata"], payload["state_dict"]
        members_meta = meta.get("members")
        if not isinstance(members_meta, list) or not 1 <= len(members_meta) <= registry.MAX_MEMBERS:
            raise registry.CheckpointError(f"{where}: metadata.members must be a list of 1 to "
                                           f"{registry.MAX_MEMBERS} member descriptions")
        alpha = meta.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise registry.CheckpointError(f"{where}: metadata.alpha = {alpha!r}; expected a finite number")
        members = []
        for k, member_meta in enumerate(members_meta):
            prefix = f"members.{k}."
            sub = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
            members.append(registry.model_from_checkpoint({"metadata": member_meta, "state_dict": sub},
                                                          f"{where}: members[{k}]"))
        committee = cls(members, alpha=float(alpha))
        if "alpha" in state:
            committee.alpha.copy_(state["alpha"])
        return committee
