"""MACE (Batatia et al., NeurIPS 2022, arXiv:2206.07697) as an alflow :class:`Potential`.

The network is mace-torch's own ``ScaleShiftMACE`` (or ``MACE``) module, fed
from alflow's batch; forces and stress come from alflow's shared autograd code
(``potentials.base.compute_properties``), like every other architecture:

* edges: MACE's ``sender = edge_index[0]``, ``receiver = edge_index[1]`` and
  ``vectors = positions[receiver] - positions[sender] + shifts``; alflow's
  ``i = edge_index[0]``, ``j = edge_index[1]`` and D = r_j - r_i + S @ cell. So
  alflow's edge_index goes in unchanged with ``shifts = S @ cell`` (the strained
  cell of each edge's structure): MACE's vectors are alflow's D, bit for bit.
* energies: alflow's buffers ``e0`` (eV per species), ``scale`` (eV) and ``shift``
  (eV/atom) are the single source of truth, as for every architecture. MACE's own
  ``atomic_energies_fn`` and ``scale_shift`` are held at 0 / 1 / 0, so MACE's
  ``node_energy`` is the unit-less output of :meth:`MACEPotential.atomic_energies`
  and E_atom = scale * out + shift + E0[species] — exactly MACE's formula. A
  model trained by ``mace_run_train`` has its E0s, scale and shift moved into
  alflow's buffers by :meth:`MACEPotential.from_mace_model`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alflow import keys
from potentials import e3nn_compat
from potentials.base import Potential

mace_modules = e3nn_compat.import_mace()  # before any e3nn import (torch >= 2.6)
extract_radial_MLP = e3nn_compat.import_mace("mace.tools.scripts_utils").extract_radial_MLP
from e3nn import o3  # noqa: E402

MODEL_CLASSES = {"ScaleShiftMACE": mace_modules.ScaleShiftMACE, "MACE": mace_modules.MACE}
GATES = dict(mace_modules.gate_dict)  # "silu", "tanh", "abs", "None"
RADIAL_TYPES = {"BesselBasis": "bessel", "GaussianBasis": "gaussian", "ChebychevBasis": "chebyshev"}
DISTANCE_TRANSFORMS = {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}
# atoms per Å³ of a close-packed metal (Cu: 4 / 3.61³ = 0.0847), for the default avg_num_neighbors
DENSE_METAL_DENSITY = 0.085


def default_avg_num_neighbors(cutoff: float) -> float:
    """Neighbours within ``cutoff`` (Å) at a close-packed metal's density: 4/3 π rc³ n (42 for Cu at 5 Å: 44.5)."""
    return round(4.0 / 3.0 * np.pi * cutoff**3 * DENSE_METAL_DENSITY, 1)


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(str, options))}")
    return value


class MACEPotential(Potential):
    """MACE message passing with higher-order equivariant messages (mace-torch's module inside).

    Hyperparameters mirror mace-torch's constructor (``mace_run_train`` flag names
    in brackets): ``hidden_irreps`` ["32x0e + 32x1o": 32 channels, L=1 messages],
    ``max_ell`` (spherical harmonics of edges), ``correlation`` (body order − 1 of
    the product basis; an int or one per layer), ``num_interactions``,
    ``num_radial_basis`` [num_radial_basis], ``num_polynomial_cutoff``,
    ``radial_MLP``, ``MLP_irreps`` and ``gate`` of the last readout,
    ``interaction``/``interaction_first`` block classes, ``avg_num_neighbors``
    (message normalisation; None: 4/3 π rc³ × 0.085 Å⁻³, a close-packed metal —
    42 for fcc Cu at 5 Å; set the mean neighbour count of your data), and the
    rarer switches of ``mace.modules.MACE``. ``atomic_numbers`` is MACE's element
    order for the one-hot input (default: sorted ``species``).
    """

    architecture = "mace"

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        hidden_irreps: str = "32x0e + 32x1o",
        max_ell: int = 3,
        correlation: int | list[int] = 3,
        num_interactions: int = 2,
        num_radial_basis: int = 8,
        num_polynomial_cutoff: int = 5,
        radial_MLP: list[int] | None = None,
        MLP_irreps: str = "16x0e",
        gate: str = "silu",
        interaction: str = "RealAgnosticResidualInteractionBlock",
        interaction_first: str = "RealAgnosticResidualInteractionBlock",
        avg_num_neighbors: float | None = None,
        radial_type: str = "bessel",
        distance_transform: str = "None",
        pair_repulsion: bool = False,
        apply_cutoff: bool = True,
        use_reduced_cg: bool = True,
        use_so3: bool = False,
        use_agnostic_product: bool = False,
        use_last_readout_only: bool = False,
        keep_last_layer_irreps: bool = False,
        edge_irreps: str | None = None,
        use_edge_irreps_first: bool = False,
        readout: str = "NonLinearReadoutBlock",
        model_class: str = "ScaleShiftMACE",
        atomic_numbers: list[int] | None = None,
    ) -> None:
        super().__init__(species, cutoff)
        _choice("interaction", interaction, list(mace_modules.interaction_classes))
        _choice("interaction_first", interaction_first, list(mace_modules.interaction_classes))
        _choice("gate", gate, list(GATES))
        _choice("readout", readout, list(mace_modules.readout_classes))
        _choice("model_class", model_class, list(MODEL_CLASSES))
        _choice("radial_type", radial_type, list(RADIAL_TYPES.values()))
        _choice("distance_transform", distance_transform, ["None", *DISTANCE_TRANSFORMS.values()])
        if int(num_interactions) < 1:
            raise ValueError(f"num_interactions: expected at least 1, got {num_interactions!r}")
        if isinstance(correlation, (list, tuple)) and len(correlation) != num_interactions:
            raise ValueError(
                f"correlation: expected one value per interaction ({num_interactions}), got {correlation!r}"
            )
        order = [int(z) for z in (atomic_numbers if atomic_numbers is not None else self.species)]
        if sorted(order) != self.species:
            raise ValueError(f"atomic_numbers: expected a permutation of the species {self.species}, got {order}")
        if avg_num_neighbors is None:
            avg_num_neighbors = default_avg_num_neighbors(self.cutoff)
        if not float(avg_num_neighbors) > 0:
            raise ValueError(f"avg_num_neighbors: expected a positive number, got {avg_num_neighbors!r}")
        radial_MLP = [64, 64, 64] if radial_MLP is None else [int(w) for w in radial_MLP]
        correlation = [int(c) for c in correlation] if isinstance(correlation, (list, tuple)) else int(correlation)
        self.hparams = dict(
            hidden_irreps=str(o3.Irreps(hidden_irreps)), max_ell=int(max_ell), correlation=correlation,
            num_interactions=int(num_interactions), num_radial_basis=int(num_radial_basis),
            num_polynomial_cutoff=int(num_polynomial_cutoff), radial_MLP=radial_MLP,
            MLP_irreps=str(o3.Irreps(MLP_irreps)), gate=gate, interaction=interaction,
            interaction_first=interaction_first, avg_num_neighbors=float(avg_num_neighbors),
            radial_type=radial_type, distance_transform=distance_transform, pair_repulsion=bool(pair_repulsion),
            apply_cutoff=bool(apply_cutoff), use_reduced_cg=bool(use_reduced_cg), use_so3=bool(use_so3),
            use_agnostic_product=bool(use_agnostic_product), use_last_readout_only=bool(use_last_readout_only),
            keep_last_layer_irreps=bool(keep_last_layer_irreps),
            edge_irreps=None if edge_irreps is None else str(o3.Irreps(edge_irreps)),
            use_edge_irreps_first=bool(use_edge_irreps_first), readout=readout, model_class=model_class,
            atomic_numbers=None if order == self.species else order,
        )
        self.mace_atomic_numbers = order
        h = self.hparams
        kwargs: dict[str, Any] = dict(
            r_max=self.cutoff, num_bessel=h["num_radial_basis"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
            max_ell=h["max_ell"], interaction_cls=mace_modules.interaction_classes[interaction],
            interaction_cls_first=mace_modules.interaction_classes[interaction_first],
            num_interactions=h["num_interactions"], num_elements=len(order),
            hidden_irreps=o3.Irreps(h["hidden_irreps"]), MLP_irreps=o3.Irreps(h["MLP_irreps"]),
            atomic_energies=np.zeros(len(order)),  # E0 lives in alflow's e0 buffer
            avg_num_neighbors=h["avg_num_neighbors"], atomic_numbers=order, correlation=correlation,
            gate=GATES[gate], pair_repulsion=h["pair_repulsion"], apply_cutoff=h["apply_cutoff"],
            use_reduced_cg=h["use_reduced_cg"], use_so3=h["use_so3"], use_agnostic_product=h["use_agnostic_product"],
            use_last_readout_only=h["use_last_readout_only"], distance_transform=distance_transform,
            edge_irreps=None if edge_irreps is None else o3.Irreps(h["edge_irreps"]),
            use_edge_irreps_first=h["use_edge_irreps_first"], radial_MLP=radial_MLP, radial_type=radial_type,
            readout_cls=mace_modules.readout_classes[readout], keep_last_layer_irreps=h["keep_last_layer_irreps"],
        )
        if model_class == "ScaleShiftMACE":  # scale and shift live in alflow's buffers
            kwargs.update(atomic_inter_scale=1.0, atomic_inter_shift=0.0)
        self.model = MODEL_CLASSES[model_class](**kwargs)
        # one-hot rows in MACE's element order, indexed by alflow's species index
        column = torch.tensor([order.index(z) for z in self.species])
        self.register_buffer("node_attr_table", torch.eye(len(order))[column], persistent=False)

    # ------------------------------------------------------------------ contract

    def mace_input(self, batch: dict[str, torch.Tensor], species: torch.Tensor) -> dict[str, torch.Tensor]:
        """MACE's data dict from an alflow batch (positions and cell possibly strained)."""
        positions = batch[keys.POSITIONS]
        if not positions.requires_grad:  # MACE calls requires_grad_() on it: keep the caller's tensor untouched
            positions = positions.detach()
        cell = batch[keys.CELL]
        edge_index = batch[keys.EDGE_INDEX]
        structure = batch[keys.BATCH]
        unit_shifts = batch[keys.SHIFTS].to(positions.dtype)
        # the same operation as alflow.neighbors.edge_vectors, so MACE's vectors equal alflow's D exactly
        shifts = torch.einsum("ek,ekx->ex", unit_shifts, cell[structure[edge_index[0]]])
        n_atoms = batch.get(keys.N_ATOMS)
        if n_atoms is None:
            n_atoms = torch.bincount(structure, minlength=cell.shape[0])
        ptr = torch.cat([n_atoms.new_zeros(1), torch.cumsum(n_atoms, 0)])
        return {
            "positions": positions,
            "cell": cell,
            "node_attrs": self.node_attr_table[species].to(positions.dtype),
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "batch": structure,
            "ptr": ptr,
        }

    def atomic_energies(
        self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor
    ) -> torch.Tensor:
        """MACE's per-atom energy with its internal E0/scale/shift at 0/1/0 (N,); ``vectors`` equal MACE's own."""
        node_attrs = self.node_attr_table[species].to(vectors.dtype)
        return mace_node_energies(self.model, node_attrs, batch[keys.EDGE_INDEX], vectors).to(vectors.dtype)

    def parameter_groups(self, weight_decay: float = 5e-7) -> list[dict[str, Any]]:
        """Optimizer groups of mace_run_train's recipe: L2 decay on the interactions' linear/skip
        weights and the products, none on the embedding, radial MLPs and readouts.

        Use as ``torch.optim.Adam(model.parameter_groups(), lr=0.01, amsgrad=True)``.
        """
        decay, no_decay = [], []
        for name, p in self.model.interactions.named_parameters():
            (decay if "linear.weight" in name or "skip_tp_full.weight" in name else no_decay).append(p)
        groups = [
            {"name": "embedding", "params": list(self.model.node_embedding.parameters()), "weight_decay": 0.0},
            {"name": "interactions_decay", "params": decay, "weight_decay": weight_decay},
            {"name": "interactions_no_decay", "params": no_decay, "weight_decay": 0.0},
            {"name": "products", "params": list(self.model.products.parameters()), "weight_decay": weight_decay},
            {"name": "readouts", "params": list(self.model.readouts.parameters()), "weight_decay": 0.0},
        ]
        covered = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.parameters() if id(p) not in covered]
        if rest:  # e.g. pair repulsion or radial parameters outside the blocks above
            groups.append({"name": "other", "params": rest, "weight_decay": 0.0})
        return groups

    # ------------------------------------------------------------------ mace_run_train models

    @classmethod
    def from_mace_model(cls, model: str | os.PathLike | torch.nn.Module, *, trusted: bool = False) -> MACEPotential:
        """Wrap a mace-torch model (a ``.model`` file from ``mace_run_train``, or the module itself).

        A ``.model`` file is a pickled ``nn.Module``: loading it runs code, so it is only
        read with ``trusted=True``. The architecture is read back from the module into
        hyperparameters, a fresh model is built from them and the weights are copied in,
        so ``potentials.save`` of the result writes a weights-only checkpoint. E0s, scale
        and shift move into alflow's ``e0``/``scale``/``shift`` buffers. The copy is checked
        against the original module on a small periodic structure.
        """
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not trusted:
                raise PermissionError(
                    f"from_mace_model: {path} is a pickled mace-torch model and loading it executes code; "
                    f"pass trusted=True only for a file you trust (e.g. one your own mace_run_train wrote)"
                )
            if not path.is_file():
                raise FileNotFoundError(f"from_mace_model: no such model file {path}")
            model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"from_mace_model: expected a mace-torch module or a .model path, got {type(model).__name__}"
            )
        hparams = mace_hparams(model)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        wrapped = cls(species=hparams["atomic_numbers"], cutoff=float(model.r_max), **hparams).to(dtype)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        e0_mace = state["atomic_energies_fn.atomic_energies"].reshape(-1)
        state["atomic_energies_fn.atomic_energies"] = wrapped.model.atomic_energies_fn.atomic_energies.detach().clone()
        if hparams["model_class"] == "ScaleShiftMACE":
            wrapped.scale.fill_(float(state["scale_shift.scale"].reshape(-1)[0]))
            wrapped.shift.fill_(float(state["scale_shift.shift"].reshape(-1)[0]))
            state["scale_shift.scale"] = wrapped.model.scale_shift.scale.detach().clone()
            state["scale_shift.shift"] = wrapped.model.scale_shift.shift.detach().clone()
        wrapped.model.load_state_dict(state, strict=True)
        order = hparams["atomic_numbers"]
        wrapped.e0.copy_(torch.stack([e0_mace[order.index(z)] for z in wrapped.species]).to(wrapped.e0))
        wrapped.to(device)
        check_against(wrapped, model)
        return wrapped

    def to_mace_model(self) -> torch.nn.Module:
        """A stand-alone copy of the mace-torch module with alflow's E0s, scale and shift put back inside.

        For mace's own tools (``MACECalculator(models=...)``, ``mace_create_lammps_model``
        after ``torch.save``). A plain ``MACE`` module has no scale/shift, so it needs
        scale 1 and shift 0.
        """
        module = copy.deepcopy(self.model)
        order = self.mace_atomic_numbers
        with torch.no_grad():
            e0 = torch.stack([self.e0[self.species.index(z)] for z in order])
            energies = module.atomic_energies_fn.atomic_energies
            module.atomic_energies_fn.atomic_energies = e0.to(energies).reshape(energies.shape)
            if self.hparams["model_class"] == "ScaleShiftMACE":
                module.scale_shift.scale.fill_(float(self.scale))
                module.scale_shift.shift.fill_(float(self.shift))
            elif float(self.scale) != 1.0 or float(self.shift) != 0.0:
                raise ValueError(
                    f"to_mace_model: a plain MACE module cannot hold scale={float(self.scale)} and "
                    f"shift={float(self.shift)}; use model_class='ScaleShiftMACE'"
                )
        return module


def _scatter_sum(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """mace-torch's ``scatter_sum`` with an out-of-place ``scatter_add`` into the fresh zeros, the same
    numbers; torch.vmap refuses mace's in-place add of a batched ``src`` into an unbatched buffer."""
    if out is not None or reduce != "sum":
        return _MACE_SCATTER_SUM(src, index, dim, out, dim_size, reduce)
    index = _mace_scatter._broadcast(index, src, dim)
    size = list(src.size())
    if dim_size is not None:
        size[dim] = dim_size
    elif index.numel() == 0:
        size[dim] = 0
    else:
        size[dim] = int(index.max()) + 1
    return torch.zeros(size, dtype=src.dtype, device=src.device).scatter_add(dim, index, src)


_mace_scatter = e3nn_compat.import_mace("mace.tools.scatter")
_MACE_SCATTER_SUM = _mace_scatter.scatter_sum
# the modules that call scatter_sum inside a MACE energy evaluation (imported by name there)
_SCATTER_USERS = [e3nn_compat.import_mace(f"mace.modules.{name}") for name in ("blocks", "radial", "models", "utils")]


@contextlib.contextmanager
def _vmap_safe_scatter() -> Iterator[None]:
    """Route mace's ``scatter_sum`` through :func:`_scatter_sum` while MACE evaluates (process-wide, reentrant)."""
    with _PATCH_LOCK:
        _PATCH_DEPTH[0] += 1
        if _PATCH_DEPTH[0] == 1:
            for module in _SCATTER_USERS:
                if getattr(module, "scatter_sum", None) is _MACE_SCATTER_SUM:
                    module.scatter_sum = _scatter_sum
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                for module in _SCATTER_USERS:
                    if getattr(module, "scatter_sum", None) is _scatter_sum:
                        module.scatter_sum = _MACE_SCATTER_SUM


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]


def mace_node_energies(
    model: torch.nn.Module, node_attrs: torch.Tensor, edge_index: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """MACE's per-atom energy (N,) (eV, float64 as MACE returns it) from given edge ``vectors`` (E, 3) Å.

    The blocks of mace-torch's ``MACE``/``ScaleShiftMACE.forward`` in the same order (so the
    same numbers), minus its graph preparation: ``prepare_graph`` calls
    ``positions.requires_grad_()``, which torch.vmap refuses, and recomputes the vectors that
    alflow already has. No autograd inside: forces and stress are taken by the caller, so a
    committee can vmap this over its members (``potentials.committee``). Single-head models only.
    """
    n_atoms = node_attrs.shape[0]
    arange = torch.arange(n_atoms, device=node_attrs.device)
    heads = torch.zeros(n_atoms, dtype=torch.int64, device=node_attrs.device)
    lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
    with _vmap_safe_scatter():
        node_e0 = model.atomic_energies_fn(node_attrs)[arange, heads]
        node_feats = model.node_embedding(node_attrs)
        edge_attrs = model.spherical_harmonics(vectors)
        edge_feats, cutoff = model.radial_embedding(lengths, node_attrs, edge_index, model.atomic_numbers)
        if hasattr(model, "pair_repulsion"):
            pair = model.pair_repulsion_fn(lengths, node_attrs, edge_index, model.atomic_numbers)
        else:
            pair = torch.zeros_like(node_e0)
        features = []
        for i, (interaction, product) in enumerate(zip(model.interactions, model.products)):
            node_feats, sc = interaction(node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
                                         edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                                         first_layer=(i == 0), lammps_class=None, lammps_natoms=(0, 0))
            node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
            features.append(node_feats)
        readouts = [readout(features[-1 if len(model.readouts) == 1 else i], heads)[arange, heads]
                    for i, readout in enumerate(model.readouts)]
    if hasattr(model, "scale_shift"):  # ScaleShiftMACE: E0 + scale_shift(pair + readouts)
        inter = model.scale_shift(torch.sum(torch.stack([pair, *readouts], dim=0), dim=0), heads)
        return node_e0.double() + inter.double()
    return torch.sum(torch.stack([node_e0, pair, *readouts], dim=-1), dim=-1)  # MACE: one sum


def mace_hparams(model: torch.nn.Module) -> dict[str, Any]:
    """:class:`MACEPotential` hyperparameters that rebuild ``model`` (a mace-torch ``ScaleShiftMACE``/``MACE``)."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ValueError(f"from_mace_model: unsupported model class {name}; expected one of {', '.join(MODEL_CLASSES)}")
    heads = list(getattr(model, "heads", ["Default"]))
    if len(heads) != 1:
        raise ValueError(
            f"from_mace_model: multi-head models are not supported (heads {heads}); "
            f"keep one head first: mace_select_head --head_name NAME model.model"
        )
    if getattr(model, "cueq_config", None) is not None or hasattr(model, "joint_embedding"):
        raise ValueError("from_mace_model: cuequivariance models and embedding_specs are not supported; "
                         "convert with mace_cueq_to_e3nn first")
    n = int(model.num_interactions)
    hidden = o3.Irreps(str(model.products[0].linear.irreps_out))
    last = o3.Irreps(str(model.products[-1].linear.irreps_out))
    correlation = []
    for product in model.products:
        try:
            correlation.append(len(product.symmetric_contractions.contractions[0].weights) + 1)
        except AttributeError:
            correlation.append(int(product.symmetric_contractions.contraction_degree))
    readout = model.readouts[-1]
    gate = "silu"
    acts = getattr(getattr(readout, "non_linearity", None), "acts", None)
    if acts:
        f = getattr(acts[0], "f", None)
        matches = [k for k, g in GATES.items() if g is f]
        if not matches:
            raise ValueError(f"from_mace_model: unknown readout gate {f!r}; expected one of {', '.join(GATES)}")
        gate = matches[0]
    radial = model.radial_embedding
    transform = getattr(radial, "distance_transform", None)
    edge_irreps = getattr(model, "edge_irreps", None)
    return dict(
        hidden_irreps=str(hidden),
        max_ell=int(model.spherical_harmonics._lmax),  # noqa: SLF001 (no public accessor)
        correlation=correlation[0] if len(set(correlation)) == 1 else correlation,
        num_interactions=n,
        num_radial_basis=int(radial.out_dim),
        num_polynomial_cutoff=int(radial.cutoff_fn.p),
        radial_MLP=[int(w) for w in extract_radial_MLP(model)],
        MLP_irreps=str(o3.Irreps(str(readout.hidden_irreps))) if hasattr(readout, "hidden_irreps") else "16x0e",
        gate=gate,
        interaction=type(model.interactions[-1]).__name__,
        interaction_first=type(model.interactions[0]).__name__,
        avg_num_neighbors=float(model.interactions[0].avg_num_neighbors),
        radial_type=RADIAL_TYPES.get(type(radial.bessel_fn).__name__, type(radial.bessel_fn).__name__),
        distance_transform="None" if transform is None else DISTANCE_TRANSFORMS.get(type(transform).__name__, "?"),
        pair_repulsion=hasattr(model, "pair_repulsion_fn"),
        apply_cutoff=bool(getattr(model, "apply_cutoff", True)),
        use_reduced_cg=bool(getattr(model, "use_reduced_cg", False)),
        use_so3=bool(getattr(model, "use_so3", False)),
        use_agnostic_product=bool(getattr(model, "use_agnostic_product", False)),
        use_last_readout_only=bool(getattr(model, "use_last_readout_only", False)),
        keep_last_layer_irreps=n > 1 and last != o3.Irreps(str(hidden[0])),
        edge_irreps=None if edge_irreps is None else str(edge_irreps),
        use_edge_irreps_first=bool(getattr(model, "use_edge_irreps_first", False)),
        readout=type(readout).__name__ if n > 1 else "NonLinearReadoutBlock",
        model_class=type(model).__name__,
        atomic_numbers=[int(z) for z in model.atomic_numbers],
    )


def probe_structure(species: Sequence[int], cutoff: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A small periodic structure holding every species (fixed seed), as an alflow batch."""
    from ase import Atoms

    from alflow.graph import atoms_to_batch

    rng = np.random.default_rng(0)
    n = max(8, 2 * len(species))
    side = (n / DENSE_METAL_DENSITY) ** (1 / 3)
    numbers = [species[k % len(species)] for k in range(n)]
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    positions = (grid + 0.5 + rng.normal(0.0, 0.1, (n, 3))) * side / 3
    atoms = Atoms(numbers=numbers, positions=positions, cell=[side] * 3, pbc=True)
    return atoms_to_batch(atoms, cutoff, dtype=dtype)


@torch.no_grad()
def check_against(wrapped: MACEPotential, original: torch.nn.Module, rtol: float | None = None) -> None:
    """Raise if ``wrapped`` and the mace-torch module disagree on per-atom energies of a probe structure."""
    parameter = next(original.parameters())
    dtype, device = parameter.dtype, parameter.device
    rtol = rtol if rtol is not None else (1e-9 if dtype == torch.float64 else 1e-4)
    batch = probe_structure(wrapped.species, wrapped.cutoff, dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    modes = wrapped.training, original.training
    wrapped.eval()
    original.eval()
    try:
        mine = wrapped(batch, forces=False)[keys.NODE_ENERGY]
        data = wrapped.mace_input(batch, wrapped.species_index(batch[keys.NUMBERS]))
        order = [int(z) for z in original.atomic_numbers]
        columns = torch.tensor([order.index(int(z)) for z in batch[keys.NUMBERS]], device=device)
        data["node_attrs"] = torch.eye(len(order), dtype=dtype, device=device)[columns]
        theirs = original(data, compute_force=False)["node_energy"].to(dtype)
    finally:
        wrapped.train(modes[0])
        original.train(modes[1])
    scale = float(theirs.abs().max().clamp_min(1.0))
    error = float((mine - theirs).abs().max())
    if not error <= rtol * scale:
        raise ValueError(
            f"from_mace_model: the rebuilt model differs from the original by {error:.3g} eV/atom on a probe "
            f"structure; its architecture could not be recovered (read hyperparameters: {mace_hparams(original)})"
        )


# ---------------------------------------------------------------------------- cuEquivariance (CUDA)


def cueq_unavailable(device: str | torch.device = "cuda") -> str | None:
    """Why cuEquivariance kernels cannot run on ``device`` (None when they can)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"cuEquivariance kernels need a CUDA device (got {device!s}, CUDA available: {torch.cuda.is_available()})"
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError as exc:
        return f"cuequivariance-torch is not installed (pip install 'alflow[cueq]'): {exc}"
    return None


def with_cueq(model: torch.nn.Module, device: str | torch.device = "cuda") -> torch.nn.Module:
    """A copy of a :class:`MACEPotential`, or of a committee of them, whose mace-torch modules run
    NVIDIA cuEquivariance kernels on ``device`` (mace-torch's own e3nn→cuEq weight transfer).

    For evaluation (MD, scoring): the copy's parameter layout is cuEq's, so save the original,
    not the copy. Other models are returned unchanged; raises ``RuntimeError`` with the reason
    when cuEquivariance cannot run (:func:`cueq_unavailable`).
    """
    reason = cueq_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"with_cueq: {reason}")
    convert = e3nn_compat.import_mace("mace.cli.convert_e3nn_cueq")
    device = torch.device(device)
    copy_ = copy.deepcopy(model).to(device)
    members = list(copy_.members) if hasattr(copy_, "members") else [copy_]
    dtype = torch.get_default_dtype()
    try:
        for member in members:
            if isinstance(member, MACEPotential) and not getattr(member, "cueq", False):
                member.model = convert.run(member.model, device=device.type, return_model=True).to(device)
                member.cueq = True
    finally:
        torch.set_default_dtype(dtype)  # the converter sets the default dtype to the model's
    if hasattr(copy_, "_apply"):
        copy_._apply(lambda t: t)  # a committee drops its cached stacked parameters
    return copy_


def maybe_cueq(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """:func:`with_cueq` where it can run (CUDA and cuequivariance-torch installed), else ``model`` as it is;
    a conversion that fails warns and keeps the e3nn model (same numbers, slower)."""
    has_mace = any(isinstance(m, MACEPotential) for m in getattr(model, "members", [model]))
    if not has_mace or cueq_unavailable(device) is not None:
        return model
    try:
        return with_cueq(model, device)
    except Exception as exc:  # noqa: BLE001 - an optimisation: never worth failing the run for
        import warnings

        warnings.warn(f"cuEquivariance conversion of the MACE model failed ({type(exc).__name__}: {exc}); "
                      "running the e3nn model", RuntimeWarning, stacklevel=2)
        return model
