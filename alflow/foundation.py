"""Starting the committee from a foundation model (issue 15; docs/foundation.md).

``potential.foundation`` names a MACE ``.model`` file (pickled code: read only with
``potential.trusted: true``) or an alflow checkpoint (a potential or a committee: its
first member). The committee is then built with the foundation's architecture,
hyperparameters, species and cutoff (the ``potential`` section's own are ignored), and on
the first training every member starts from the foundation's weights:

1. **Reference energies aligned** (``potential.align_e0``): on the first labelled frames
   (at most ``potential.align_frames``, lowest iteration first), a per-element shift δ_Z
   (eV) is fitted by least squares of composition counts against E_ref − E_foundation
   (optionally, ``potential.align_scale``, first a scale s of the network's output from the
   forces, s = ⟨F_ref·F_f⟩/⟨F_f·F_f⟩, with E_foundation then recomputed as E0 + s·(E_f − E0)):
   ``e0[Z] += δ_Z`` and ``scale *= s`` on the aligned foundation, written to
   ``run_dir/foundation/alignment.json`` and logged; the aligned model is kept as
   ``run_dir/foundation/aligned.pt``.
2. **Member initialisation**: member k is a copy of the aligned foundation; with
   ``potential.reinit_readout`` its readout parameters (every parameter whose name has a
   ``readout`` component) are redrawn, Gaussian with each tensor's own standard deviation,
   from seed ``run seed + k``. Diversity otherwise comes from the trainer's per-member
   seeds (batch order) and ``committee.bootstrap``.
3. **Frozen layers** (``potential.freeze``): parameter-name prefixes (``model.interactions.0``,
   ``embedding``); every prefix must match a parameter of the foundation (an unknown one is
   a ConfigError naming it and listing the model's top-level modules); matching parameters
   get ``requires_grad = False`` in every iteration, and the trainer leaves them alone.
4. **Replay** (``training.replay_frames`` > 0): up to that many structures, drawn (seeded)
   from the initial set and the frames explored in earlier iterations, labelled by the
   aligned foundation itself (energy eV, forces eV/Å, stress eV/Å³ of 3D cells), join every
   member's training set (never validation, test or calibration) with weight
   ``training.replay_weight``: each replay frame appears floor(w) or ceil(w) times per epoch
   (stochastic rounding per member), so its expected share of the loss is w times a DFT
   frame's. The foundation's labels are cached by frame hash in ``run_dir/foundation/replay.extxyz``.

Species of the run outside the foundation's are a ConfigError naming them (preflight and
the train stage).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from torch import nn

from alflow import keys
from alflow.config import ConfigError

log = logging.getLogger(__name__)

FOUNDATION_DIR = "foundation"  # under the run directory
ALIGNMENT_FILE = "alignment.json"
ALIGNED_MODEL = "aligned.pt"
REPLAY_FILE = "replay.extxyz"
REPLAY_SOURCE = "foundation_replay"  # info[SOURCE] of a replay frame


# ----------------------------------------------------------------------------- loading and checks


def load_foundation(path: str | os.PathLike, *, trusted: bool = False, where: str = "potential.foundation") -> nn.Module:
    """The foundation as one alflow ``Potential`` (CPU, eval mode).

    A MACE ``.model`` file (pickled code) needs ``trusted``; an alflow checkpoint (weights only)
    does not; a committee checkpoint gives its first member. Errors are ConfigErrors naming ``where``.
    """
    import potentials

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: {path}: no such model file")
    if path.suffix == ".model":
        if not trusted:
            raise ConfigError(f"{where}: {path} is a pickled mace-torch .model file and loading it executes code; "
                              "set potential.trusted: true only for a file you trust (docs/foundation.md)")
        from potentials.mace import MACEPotential

        try:
            model = MACEPotential.from_mace_model(path, trusted=True)
        except Exception as err:  # noqa: BLE001 - any reason it cannot be read: its own message
            raise ConfigError(f"{where}: {path}: cannot be read as a MACE model ({type(err).__name__}: {err})") from None
    else:
        try:
            model = potentials.load(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - CheckpointError names the file
            raise ConfigError(f"{where}: {path}: not an alflow checkpoint ({type(err).__name__}: {err}); a MACE "
                              "model must end in .model") from None
    if hasattr(model, "members"):
        model = model.members[0]
    return model.to("cpu").eval()


def check_species(model: nn.Module, species: Sequence[int], where: str = "potential.foundation") -> None:
    """ConfigError naming the run's elements the foundation has no weights for."""
    missing = sorted(set(int(z) for z in species) - set(int(z) for z in model.species))
    if missing:
        raise ConfigError(f"{where}: the foundation model has no weights for element(s) "
                          f"{', '.join(chemical_symbols[z] for z in missing)} of this run (it knows "
                          f"{', '.join(chemical_symbols[z] for z in model.species)})")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_freeze(model: nn.Module, prefixes: Sequence[str], where: str = "potential.freeze") -> None:
    """ConfigError naming every prefix that matches no parameter of ``model``."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(_matches(n, p) for n in names)]
    if unknown:
        top = sorted({".".join(n.split(".")[:2]) if n.startswith("model.") else n.split(".")[0] for n in names})
        raise ConfigError(f"{where}: no parameter of the foundation model is named {', '.join(map(repr, unknown))} "
                          f"or below it; its modules: {', '.join(top)}")


def freeze(model: nn.Module, prefixes: Sequence[str]) -> int:
    """``requires_grad = False`` for every parameter under a prefix (each member of a committee); returns how many."""
    members = list(model.members) if hasattr(model, "members") else [model]
    n = 0
    for member in members:
        for name, p in member.named_parameters():
            if any(_matches(name, pre) for pre in prefixes):
                p.requires_grad_(False)
                n += 1
    return n


def readout_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters with a ``readout`` component in their name (SchNet/PaiNN ``readout``, MACE ``model.readouts``)."""
    return [(n, p) for n, p in model.named_parameters() if any(part.startswith("readout") for part in n.split("."))]


@torch.no_grad()
def reinit_readout(model: nn.Module, seed: int) -> int:
    """Redraw the readout parameters: Gaussian with each tensor's own std (zeros stay zeros); returns how many."""
    params = readout_parameters(model)
    if not params:
        raise ConfigError(f"potential.reinit_readout: architecture {getattr(model, 'architecture', '?')!r} has no "
                          "parameter named *readout*; set reinit_readout: false")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for _, p in params:
        std = float(p.detach().double().std()) if p.numel() > 1 else float(p.detach().abs().mean())
        if std > 0:
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * std).to(p))
    return len(params)


# ----------------------------------------------------------------------------- predictions and alignment


def predict(model: nn.Module, frames: Sequence[Atoms], stress: bool = False) -> list[dict[str, np.ndarray]]:
    """Energy (eV), forces (eV/Å) and, for 3D cells with ``stress``, stress (3, 3; eV/Å³) of each frame."""
    from alflow.graph import atoms_to_batch

    dtype = next(p.dtype for p in model.parameters())
    out = []
    for atoms in frames:
        want = stress and bool(np.all(atoms.pbc))
        batch = atoms_to_batch(atoms, model.cutoff, dtype=dtype, device="cpu")
        res = model(batch, forces=True, stress=want)
        row = {"energy": float(res[keys.ENERGY][0].detach()), "forces": res[keys.FORCES].detach().double().numpy()}
        if want:
            row["stress"] = res[keys.STRESS][0].detach().double().numpy()
        out.append(row)
    return out


def alignment_frames(frames: Sequence[Atoms], n: int) -> list[Atoms]:
    """The first labelled frames: lowest ``info['iteration']`` first (the initial set is -1), at most ``n``."""
    order = sorted(range(len(frames)), key=lambda i: (int(frames[i].info.get(keys.ITERATION, -1)), i))
    return [frames[i] for i in order[:n]]


def fit_alignment(model: nn.Module, frames: Sequence[Atoms], *, scale: bool = False) -> dict[str, Any]:
    """Per-element shift δ_Z (eV) and scale s fitted on ``frames`` (module doc); ``model`` is not changed.

    Returns ``{"shift": {symbol: eV}, "scale": s, "n_frames", "energy_rmse_before", "energy_rmse_after"``
    (eV/atom, foundation vs reference on these frames)``}``.
    """
    if not frames:
        raise ValueError("fit_alignment: no labelled frames")
    pred = predict(model, frames)
    e_ref = np.array([float(a.info[keys.REF_ENERGY]) for a in frames])
    e_f = np.array([p["energy"] for p in pred])
    n_at = np.array([len(a) for a in frames], float)
    s = 1.0
    if scale:
        f_ref = np.concatenate([np.asarray(a.arrays[keys.REF_FORCES], float).ravel() for a in frames])
        f_f = np.concatenate([p["forces"].ravel() for p in pred])
        denom = float(f_f @ f_f)
        s = float(f_ref @ f_f) / denom if denom > 0 else 1.0
        e0 = dict(zip(model.species, model.e0.detach().double().tolist()))
        base = np.array([sum(e0[int(z)] for z in a.numbers) for a in frames])
        e_f = base + s * (e_f - base)  # E0 unscaled, the network part (scale·out + shift) scaled
    zs = sorted({int(z) for a in frames for z in a.numbers})
    A = np.zeros((len(frames), len(zs)))
    for i, a in enumerate(frames):
        for z, c in Counter(int(z) for z in a.numbers).items():
            A[i, zs.index(z)] = c
    delta, *_ = np.linalg.lstsq(A, e_ref - e_f, rcond=None)
    after = e_ref - e_f - A @ delta
    return {"shift": {chemical_symbols[z]: float(d) for z, d in zip(zs, delta)}, "scale": s,
            "n_frames": len(frames),
            "energy_rmse_before": float(np.sqrt(np.mean(((e_ref - np.array([p["energy"] for p in pred])) / n_at) ** 2))),
            "energy_rmse_after": float(np.sqrt(np.mean((after / n_at) ** 2)))}


@torch.no_grad()
def apply_alignment(model: nn.Module, alignment: dict[str, Any]) -> nn.Module:
    """``e0[Z] += δ_Z`` and the network part scaled by s (``scale *= s``, ``shift *= s``), in place."""
    s = float(alignment.get("scale", 1.0))
    model.scale.mul_(s)
    model.shift.mul_(s)
    for symbol, d in alignment["shift"].items():
        z = chemical_symbols.index(symbol)
        model.e0[model.species.index(z)] += float(d)
    return model


# ----------------------------------------------------------------------------- the run's foundation state


def foundation_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FOUNDATION_DIR


def aligned_foundation(cfg: Any, run_dir: str | os.PathLike, frames: Sequence[Atoms], species: Sequence[int]) -> nn.Module:
    """The foundation with the run's alignment applied: ``aligned.pt`` if written, else fitted now and written."""
    import potentials
    from alflow.fileio import atomic_write_text

    d = foundation_dir(run_dir)
    path = d / ALIGNED_MODEL
    if path.is_file():
        return potentials.load(path, device="cpu").eval()
    pot = cfg.potential
    model = load_foundation(pot.foundation, trusted=pot.trusted)
    check_species(model, species)
    check_freeze(model, pot.freeze)
    alignment: dict[str, Any] = {"shift": {}, "scale": 1.0, "n_frames": 0}
    if pot.align_e0:
        alignment = fit_alignment(model, alignment_frames(frames, pot.align_frames), scale=pot.align_scale)
        apply_alignment(model, alignment)
    alignment["foundation"] = str(pot.foundation)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / ALIGNMENT_FILE, json.dumps(alignment, indent=1))
    log.info("foundation %s: reference energies aligned on %d frames: shift %s eV, scale %.4g; energy RMSE "
             "%.4g -> %.4g eV/atom", pot.foundation, alignment["n_frames"],
             {k: round(v, 4) for k, v in alignment["shift"].items()}, alignment["scale"],
             alignment.get("energy_rmse_before", float("nan")), alignment.get("energy_rmse_after", float("nan")))
    potentials.save(model, path)
    return model


def read_alignment(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's alignment record (``alignment.json``), or None before the first training."""
    path = foundation_dir(run_dir) / ALIGNMENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def metrics_fields(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The alignment for a metrics row: ``foundation_e0_shift`` {symbol: eV}, ``foundation_scale``; {} without one."""
    alignment = read_alignment(run_dir)
    if alignment is None:
        return {}
    return {"foundation_e0_shift": alignment["shift"], "foundation_scale": alignment["scale"]}


def build_committee(foundation: nn.Module, k: int) -> nn.Module:
    """A committee of ``k`` members with the foundation's architecture, hparams, species and cutoff."""
    from potentials.committee import Committee

    return Committee([copy.deepcopy(foundation) for _ in range(int(k))])


def init_members(foundation: nn.Module, k: int, *, reinit: bool, seed: int) -> list[nn.Module]:
    """K warm-start sources: copies of the (aligned) foundation, readouts redrawn per member with ``reinit``."""
    out = []
    for i in range(int(k)):
        m = copy.deepcopy(foundation)
        if reinit:
            reinit_readout(m, seed + i)
        out.append(m)
    return out


def replay_pool(run_dir: str | os.PathLike, frames: Sequence[Atoms], iteration: int) -> list[Atoms]:
    """Structures the foundation labels for replay: the initial set and the frames explored before ``iteration``."""
    import ase.io

    from alflow.loop import stage_key

    pool = [a.copy() for a in frames if int(a.info.get(keys.ITERATION, -1)) < 0]
    for j in range(iteration):
        d = Path(run_dir) / stage_key("explore", j)
        for path in sorted(d.glob("*.extxyz")) if d.is_dir() else []:
            try:
                pool += ase.io.read(path, index=":", format="extxyz")
            except Exception:  # noqa: BLE001 - an unreadable trajectory only shrinks the pool
                log.warning("replay: cannot read %s; skipped", path)
    return pool


def replay_frames(model: nn.Module, pool: Sequence[Atoms], n: int, seed: int,
                  cache: str | os.PathLike | None = None) -> list[Atoms]:
    """Up to ``n`` structures of ``pool`` (drawn with ``seed``) labelled by ``model`` (REF_* keys), cached by hash."""
    import ase.io

    from alflow.io import frame_hash, write_extxyz_atomic
    from alflow.voigt import to_voigt

    if n <= 0 or not pool:
        return []
    unique: dict[str, Atoms] = {}
    for a in pool:
        unique.setdefault(frame_hash(a), a)
    hashes = sorted(unique)
    rng = np.random.default_rng([int(seed), 15])
    chosen = [hashes[i] for i in sorted(rng.choice(len(hashes), size=min(n, len(hashes)), replace=False))]
    stored: dict[str, Atoms] = {}
    if cache is not None and Path(cache).is_file():
        stored = {a.info.get(keys.FRAME_HASH): a for a in ase.io.read(cache, index=":", format="extxyz")}
    todo = [h for h in chosen if h not in stored]
    for h, p in zip(todo, predict(model, [unique[h] for h in todo], stress=True)):
        src = unique[h]
        atoms = Atoms(numbers=src.numbers, positions=src.positions, cell=src.cell, pbc=src.pbc)
        atoms.info.update({keys.REF_ENERGY: p["energy"], keys.SOURCE: REPLAY_SOURCE, keys.FRAME_HASH: h})
        atoms.arrays[keys.REF_FORCES] = p["forces"]
        if "stress" in p:
            atoms.info[keys.REF_STRESS] = to_voigt(p["stress"])
        stored[h] = atoms
    if cache is not None and todo:
        write_extxyz_atomic(list(stored.values()), cache)
    return [stored[h] for h in chosen]


def explore_initial(model: nn.Module, structures: Sequence[Atoms], spec: Any, seed: int) -> list[Atoms]:
    """``spec.n_frames`` diverse frames from Langevin MD with ``model`` (ASE, ``spec.temperature`` K,
    ``spec.timestep`` fs, ``spec.steps`` steps per structure, a snapshot every ``spec.stride``), picked by
    farthest-point sampling in ``alflow.select.structure_descriptors`` space (the first pick is the snapshot
    farthest from the mean). Returned without calculator or labels."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from alflow.calculator import AlflowCalculator
    from alflow.select import structure_descriptors

    calc = AlflowCalculator(model, device="cpu")
    rng = np.random.default_rng([int(seed), 4])
    snaps: list[Atoms] = []
    for start in structures:
        atoms = start.copy()
        atoms.calc = calc
        MaxwellBoltzmannDistribution(atoms, temperature_K=spec.temperature, rng=rng)
        md = Langevin(atoms, spec.timestep * units.fs, temperature_K=spec.temperature, friction=0.01 / units.fs,
                      rng=rng)
        for _ in range(max(1, spec.steps // spec.stride)):
            md.run(spec.stride)
            snaps.append(Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc))
    if len(snaps) <= spec.n_frames:
        return snaps
    x = structure_descriptors(snaps)
    chosen = [int(np.argmax(((x - x.mean(axis=0)) ** 2).sum(1)))]
    dist = ((x - x[chosen[0]]) ** 2).sum(1)
    while len(chosen) < spec.n_frames:
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, ((x - x[k]) ** 2).sum(1))
    return [snaps[k] for k in chosen]


def foundation_start(cfg: Any, run_dir: Path, frames: Sequence[Atoms], species: Sequence[int], iteration: int,
                     init_from: Any) -> tuple[nn.Module, Any, list[Atoms]]:
    """The train stage's committee, warm-start sources and replay frames for a run with a foundation.

    ``init_from`` None (the first training, or ``warm_start: false``): members start from the aligned
    foundation (readouts redrawn with ``reinit_readout``); otherwise from ``init_from`` as usual.
    """
    pot = cfg.potential
    found = aligned_foundation(cfg, run_dir, frames, species)
    check_species(found, species)
    committee = build_committee(found, cfg.committee.size)
    if init_from is None:
        init_from = init_members(found, cfg.committee.size, reinit=pot.reinit_readout, seed=cfg.seed)
    if pot.freeze:
        freeze(committee, pot.freeze)
    replay: list[Atoms] = []
    if cfg.training.replay_frames > 0 and cfg.training.replay_weight > 0:
        pool = replay_pool(run_dir, frames, iteration)
        replay = replay_frames(found, pool, cfg.training.replay_frames, cfg.seed + iteration,
                               cache=foundation_dir(run_dir) / REPLAY_FILE)
    return committee, init_from, replay
