"""Training of one potential and of a committee on labelled frames.

Recipe (``train_potential``):

* Loss: ``energy_weight`` · mean_frames(((E - E_ref)/N)²) + ``forces_weight`` · mean over
  force components (F - F_ref)² + ``stress_weight`` · mean over the 9 components of frames
  that carry a stress (σ - σ_ref)²: eV²/atom², (eV/Å)², (eV/Å³)², no further normalisation.
* Normalisation of a fresh model (no ``init_from``): E0 per element by least squares on
  the training frames (``alflow.data.fit_e0``, in the order of ``model.species``; 0 for a
  species absent from the data), shift = mean over training frames of (E - Σ E0)/N
  (eV/atom) and scale = RMS of the training force components (eV/Å; the std of the
  per-atom residual energy, or 1, when forces are all zero), the MACE/nequip recipe.
* AdamW (lr, weight_decay); ReduceLROnPlateau on the validation loss (factor 0.5,
  patience max(1, patience // 3) epochs, floor lr/1000); gradient-norm clipping at
  ``grad_clip``; EMA of the weights with decay min(ema_decay, (1+n)/(10+n)) after n
  steps. Validation, early stopping (``patience`` epochs without a lower validation
  loss), the best checkpoint and the returned weights all use the EMA weights.
* ``max_time_s`` is checked after every batch; the validation of the last (partial)
  epoch and the final metrics run past it.
* Warm start (``init_from``, same architecture/hparams/species/cutoff): weights and the
  E0/scale/shift buffers are copied and kept (not refitted), because the network was
  trained against them; only the optimiser starts afresh. The best checkpoint is chosen
  among the trained epochs (≥ 1): the warm-start weights themselves never win, so new
  labels are never discarded because the old validation frames liked the old model.
* Non-finite loss, gradient norm or validation loss: training stops, the model gets the
  last good (best) weights back, ``out_dir/best.pt`` keeps them, and
  ``TrainingDivergedError`` is raised.
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
    """One trained potential: split sizes, epochs, timings, losses, metrics per split, file paths."""

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


def batch_loss(
    pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], config: TrainingConfig, stress: bool
) -> torch.Tensor:
    """The weighted MSE loss of one batch (see module doc)."""
    n = batch[keys.N_ATOMS].to(pred[keys.ENERGY].dtype)
    loss = config.energy_weight * torch.mean(((pred[keys.ENERGY] - batch[keys.REF_ENERGY]) / n) ** 2)
    if config.forces_weight > 0:
        loss = loss + config.forces_weight * torch.mean((pred[keys.FORCES] - batch[keys.REF_FORCES]) ** 2)
    if stress:
        mask = batch[STRESS_MASK]
        loss = loss + config.stress_weight * torch.mean((pred[keys.STRESS] - batch[keys.REF_STRESS])[mask] ** 2)
    return loss


def metric_loss(metrics: dict[str, Any], config: TrainingConfig) -> float:
    """The loss of a whole split from its accumulated MSEs."""
    e, f, s = metrics["_mse"]
    return config.energy_weight * e + config.forces_weight * f + config.stress_weight * s


def _write_json(data: dict[str, Any], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
    return str(path)


# ----------------------------------------------------------------------------- the loop


def _fit(
    model: nn.Module,
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
    """Train ``model`` (on ``cache.device``) on cached frames; returns with the best EMA weights loaded."""
    import potentials
    from tqdm.auto import tqdm

    start = time.perf_counter()
    deadline = start + config.max_time_s if config.max_time_s else None
    rng = np.random.default_rng(seed)
    use_stress = config.stress_weight > 0
    use_forces = config.forces_weight > 0 or use_stress
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=max(1, config.patience // 3), min_lr=config.lr * 1e-3
    )
    ema = EMA(model, config.ema_decay)
    checkpoint = out_dir / CHECKPOINT_NAME if out_dir is not None else None

    def validate() -> tuple[float, dict[str, Any]]:
        with ema.applied():
            m = evaluate_cached([model], cache, valid_idx, config.batch_size, stress=use_stress)
        return metric_loss(m, config), m

    def keep_best() -> dict[str, torch.Tensor]:
        with ema.applied():
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                potentials.save(model, checkpoint)
        return state

    initial_loss, m0 = validate()
    if not math.isfinite(initial_loss):
        raise TrainingError(f"{desc}: the initial validation loss is {initial_loss}; check the model and the labels")
    # a fresh model's initial weights may be kept (nothing better found); a warm-started model's may not: they
    # have not seen the new labels, which in active learning sit where the model is wrong and rarely in the
    # (content-split) validation set, so its validation loss often rises first and "best" would discard them
    best_loss, best_epoch, best_state = (math.inf if warm else initial_loss), 0, keep_best()
    history = [{"epoch": 0, "train_loss": None, "valid_loss": initial_loss,
                "valid_forces_rmse": m0["forces_rmse"], "lr": config.lr, "seconds": time.perf_counter() - start}]
    stop_reason, bad_epochs, epoch = "max_epochs", 0, 0

    def diverged(what: str, epoch: int) -> TrainingDivergedError:
        model.load_state_dict(best_state)
        where = f"saved in {checkpoint}" if checkpoint is not None else "not saved (no out_dir)"
        return TrainingDivergedError(
            f"{desc}: training diverged ({what} at epoch {epoch}); stopped and restored the last good weights "
            f"(epoch {best_epoch}, validation loss {best_loss:.6g}), {where}. Lower training.lr or check the labels.",
            epoch=epoch, best_epoch=best_epoch, checkpoint=str(checkpoint) if checkpoint else None,
        )

    bar = tqdm(total=config.epochs, desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, count, out_of_time = 0.0, 0, False
            for chunk in cache.batches(rng.permutation(np.asarray(train_idx)), config.batch_size):
                batch = cache.collate(chunk)
                stress = use_stress and any(cache.has_stress[i] for i in chunk)
                pred = model(batch, forces=use_forces, stress=stress, create_graph=True)
                loss = batch_loss(pred, batch, config, stress)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise diverged(f"training loss {value}", epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
                    if not math.isfinite(norm):
                        raise diverged(f"gradient norm {norm}", epoch)
                optimizer.step()
                ema.update()
                total, count = total + value * len(chunk), count + len(chunk)
                if deadline is not None and time.perf_counter() > deadline:
                    out_of_time = True
                    break
            valid_loss, m = validate()
            if not math.isfinite(valid_loss):
                raise diverged(f"validation loss {valid_loss}", epoch)
            scheduler.step(valid_loss)
            if valid_loss < best_loss:
                best_loss, best_epoch, best_state, bad_epochs = valid_loss, epoch, keep_best(), 0
            else:
                bad_epochs += 1
            train_loss = total / max(count, 1)
            history.append({"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                            "valid_forces_rmse": m["forces_rmse"], "lr": optimizer.param_groups[0]["lr"],
                            "seconds": time.perf_counter() - start})
            bar.set_postfix(train=f"{train_loss:.4g}", valid=f"{valid_loss:.4g}", f_rmse=f"{m['forces_rmse']:.4f}",
                            best=best_epoch, refresh=False)
            bar.update(1)
            if out_of_time:
                stop_reason = "max_time"
                break
            if bad_epochs >= config.patience:
                stop_reason = "patience"
                break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - start
    metrics = {}
    for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", test_idx)):
        if len(idx):
            metrics[name] = public(evaluate_cached([model], cache, idx, config.batch_size))
    result = TrainResult(
        architecture=getattr(model, "architecture", type(model).__name__), n_train=len(train_idx),
        n_valid=len(valid_idx), n_test=len(test_idx), epochs=epoch, best_epoch=best_epoch,
        stop_reason=stop_reason, seconds=seconds, warm_start=warm, initial_valid_loss=initial_loss,
        best_valid_loss=best_loss, metrics=metrics, checkpoint=str(checkpoint) if checkpoint else None,
        metrics_path=str(out_dir / METRICS_NAME) if out_dir is not None else None, history=tuple(history),
    )
    if out_dir is not None:
        _write_json(result.to_dict(), out_dir / METRICS_NAME)
    return result


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
    n_t, n_v = len(train_frames), len(valid_frames)
    return _fit(model, cache, range(n_t), range(n_t, n_t + n_v), range(n_t + n_v, len(frames)), config,
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
) -> CommitteeTrainResult:
    """Train every member (a ``Committee``'s ``members`` or a list of potentials) one after another.

    One train/valid/test split of ``frames`` by ``seed`` (``alflow.data.split`` with
    ``config.valid_fraction`` and ``config.test_fraction``; ``stable_split``:
    ``alflow.data.stable_split``, where a frame keeps its part as the dataset grows, for
    warm-started retraining) is shared; member k trains
    with seed ``seed + k`` (batch order) and, with ``bootstrap``, on a resample with
    replacement of the training frames of the same size; a fresh member's E0/scale/shift
    are fitted on its own training frames. ``init_from``: a committee
    with as many members (member k warm-starts from member k), or one potential that
    every member starts from. With ``out_dir``: ``member_<k>/`` (best.pt, metrics.json),
    ``metrics.json`` (this result) and, for a Committee, ``committee.pt``.
    """
    from alflow.data import split, stable_split as split_by_content

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
        train_idx, valid_idx, test_idx = split_by_content(frames, fractions, seed)
    else:
        train_idx, valid_idx, test_idx = split(len(frames), fractions, seed)
    _need_split(len(train_idx), len(valid_idx), "")
    start = time.perf_counter()
    if isinstance(models, nn.Module):
        target = _prepare(models, device, dtype)  # a Committee: its own buffers move too
    else:
        for m in members:
            target = _prepare(m, device, dtype)
    cache = GraphCache(frames, cutoffs.pop(), model_dtype(members[0]), target)
    out = Path(out_dir) if out_dir is not None else None
    results = []
    for k, (member, source) in enumerate(zip(members, sources)):
        rng = np.random.default_rng([seed, k])
        idx = np.sort(rng.choice(train_idx, size=len(train_idx), replace=True)) if bootstrap else train_idx
        if source is not None:
            warm_start(member, source)
        else:
            fit_normalization(member, [frames[i] for i in idx])
        results.append(_fit(member, cache, idx, valid_idx, test_idx, config, seed=seed + k,
                            out_dir=out / f"member_{k}" if out is not None else None, progress=progress,
                            warm=source is not None, desc=f"member {k + 1}/{len(members)}"))
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
    )
    if out is not None:
        _write_json(result.to_dict(), out / METRICS_NAME)
    return result
