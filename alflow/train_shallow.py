"""Training of a shallow committee (``committee.kind: shallow``, ``potentials/shallow.py``).

Two stages, on one train/valid/test split (as ``train_committee``):

1. **Trunk and head mean** by the ordinary recipe (``alflow.train.train_potential``: MSE on
   energies/forces/stress of the heads' mean, EMA, early stopping, normalisation, warm start)
   for ``training.epochs``.
2. **NLL fine-tuning** for ``training.nll_epochs`` epochs: AdamW on the heads (lr) and the trunk
   (lr · ``training.nll_trunk_lr_factor``; 0 freezes it) and on log s, the calibration scale,
   with the loss

       L = energy_weight · mean((Ē - E_ref)/N)² + forces_weight · mean(F̄ - F_ref)²
           + nll_weight · mean_{i,c} [ ½ log σ_ic² + (F̄_ic - F_ref,ic)² / (2 σ_ic²) ]

   σ_ic² = s² · var_k(F_ic^k) + 10⁻⁶ (eV/Å)² (``forces_mode: heads``), or s² · var_k(E_i^k)/3
   (``mean``: the per-atom energy spread, s in 1/Å). The Gaussian NLL on forces (Kellner &
   Ceriotti 2024) spreads the heads where the mean is wrong; s absorbs the global scale, so the
   spread is calibrated by construction: α = s is set on the committee at the end (the loop may
   recalibrate it further). The weights with the lowest validation NLL are kept.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ase import Atoms

from alflow import keys
from alflow.config import TrainingConfig
from alflow.train import (
    METRICS_NAME,
    CommitteeTrainResult,
    PackedGraphs,
    _write_json,
    check_frames,
    make_batches,
    train_potential,
)
from alflow.metrics import GraphCache, evaluate_cached, public

VAR_FLOOR = 1e-6  # (eV/Å)², keeps log σ² finite where all heads agree


def nll_terms(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], log_s: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian NLL per force component (mean), and the MSEs of energy per atom and force of the mean.

    ``out`` is an uncalibrated (α = 1) ShallowCommittee output on ``batch`` (with labels).
    """
    err = out[keys.FORCES] - batch[keys.REF_FORCES]
    var = torch.exp(2 * log_s) * out[keys.FORCES_VAR] + VAR_FLOOR
    nll = 0.5 * (torch.log(var) + err**2 / var).mean() + 0.5 * math.log(2 * math.pi)
    n = batch[keys.N_ATOMS].to(err.dtype)
    e_mse = (((out[keys.ENERGY] - batch[keys.REF_ENERGY]) / n) ** 2).mean()
    return nll, e_mse, (err**2).mean()


def _nll_loop(committee: Any, packed: PackedGraphs, train_idx: Sequence[int], valid_idx: Sequence[int],
              config: TrainingConfig, nll_epochs: int, nll_weight: float, trunk_lr_factor: float, seed: int,
              ) -> dict[str, Any]:
    """Stage 2 (module doc); returns the NLL history and the fitted scale s."""
    dtype = next(committee.parameters()).dtype
    log_s = torch.zeros((), dtype=dtype, device=packed.device, requires_grad=True)
    groups = [{"params": list(committee.heads.parameters()), "lr": config.lr},
              {"params": [log_s], "lr": max(config.lr, 1e-2)}]
    trunk = committee.trunk_parameters()
    if trunk_lr_factor > 0:
        groups.append({"params": trunk, "lr": config.lr * trunk_lr_factor})
    else:
        for p in trunk:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    rng = np.random.default_rng([seed, 7])

    def validate() -> float:
        committee.eval()
        total, n = 0.0, 0
        for chunk in make_batches(None, valid_idx, config, packed.n_atoms):
            batch = packed.gather(chunk)
            out = committee(batch, forces=True, create_graph=False, calibrated=False)
            nll, e_mse, f_mse = nll_terms(out, batch, log_s.detach())
            w = 3 * int(packed.n_atoms[chunk].sum())
            total += float(nll.detach()) * w
            n += w
        return total / max(n, 1)

    best = validate()
    best_state = {k: v.detach().clone() for k, v in committee.state_dict().items()}
    best_s = float(log_s.detach().exp())
    history = [{"epoch": 0, "valid_nll": best}]
    for epoch in range(1, nll_epochs + 1):
        committee.train()
        for chunk in make_batches(rng, train_idx, config, packed.n_atoms):
            batch = packed.gather(chunk)
            out = committee(batch, forces=True, create_graph=True, calibrated=False)
            nll, e_mse, f_mse = nll_terms(out, batch, log_s)
            loss = nll_weight * nll + config.energy_weight * e_mse + config.forces_weight * f_mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.grad_clip)
            opt.step()
        valid = validate()
        history.append({"epoch": epoch, "valid_nll": valid, "s": float(log_s.detach().exp())})
        if math.isfinite(valid) and valid < best:
            best, best_s = valid, float(log_s.detach().exp())
            best_state = {k: v.detach().clone() for k, v in committee.state_dict().items()}
    for p in trunk:
        p.requires_grad_(True)
    committee.load_state_dict(best_state)
    committee.eval()
    return {"history": history, "best_valid_nll": best, "s": best_s}


def train_shallow(
    committee: Any,
    frames: Sequence[Atoms],
    config: TrainingConfig,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    init_from: Any = None,
    stable_split: bool = False,
) -> CommitteeTrainResult:
    """Train a ``ShallowCommittee`` in place (module doc): stage 1 by ``train_potential``, stage 2 NLL.

    ``init_from``: a ShallowCommittee (or its checkpoint path) with as many heads to warm-start from.
    With ``out_dir``: ``trunk/`` (stage 1's best.pt, metrics.json), ``committee.pt`` and ``metrics.json``.
    On return the committee is in eval mode with α = s.
    """
    from alflow.data import split, stable_split as split_by_content
    from alflow.train import _as_model

    if config.valid_fraction == 0:
        raise ValueError("training.valid_fraction is 0: early stopping needs at least 1 validation frame")
    check_frames(frames, committee.species, "dataset")
    fractions = (1.0 - config.valid_fraction - config.test_fraction, config.valid_fraction, config.test_fraction)
    splitter = split_by_content(frames, fractions, seed) if stable_split else split(len(frames), fractions, seed)
    train_idx, valid_idx, test_idx = (np.asarray(i, dtype=np.int64) for i in splitter)
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    source = None
    if init_from is not None:
        prev = _as_model(init_from)
        if getattr(prev, "n_members", None) != committee.n_members or not hasattr(prev, "heads"):
            raise ValueError("init_from: expected a shallow committee with "
                             f"{committee.n_members} heads, got {type(prev).__name__}")
        source = prev.model
    stage1 = train_potential(committee.model, [frames[i] for i in train_idx], [frames[i] for i in valid_idx],
                             config, test_frames=[frames[i] for i in test_idx], device=device, dtype=dtype,
                             seed=seed, out_dir=out / "trunk" if out is not None else None, progress=progress,
                             init_from=source)
    committee.to(next(committee.model.parameters()).device)  # α follows the trunk
    nll_epochs = int(getattr(config, "nll_epochs", 20))
    nll_weight = float(getattr(config, "nll_weight", 1.0))
    trunk_lr_factor = float(getattr(config, "nll_trunk_lr_factor", 0.1))
    target = committee.alpha.device
    cache = GraphCache(frames, committee.cutoff, committee.alpha.dtype, target)
    packed = PackedGraphs(cache, committee.species_index)
    stage2 = {"history": [], "s": 1.0}
    if nll_epochs > 0:
        stage2 = _nll_loop(committee, packed, train_idx, valid_idx, config, nll_epochs, nll_weight,
                           trunk_lr_factor, seed)
    committee.set_alpha(stage2["s"])
    committee.eval()
    metrics = {name: public(evaluate_cached([committee], cache, idx, config.batch_size))
               for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", test_idx)) if len(idx)}
    checkpoint = None
    if out is not None:
        import potentials

        checkpoint = str(potentials.save(committee, out / "committee.pt"))
    result = CommitteeTrainResult(
        members=(stage1,), train_idx=tuple(int(i) for i in train_idx), valid_idx=tuple(int(i) for i in valid_idx),
        test_idx=tuple(int(i) for i in test_idx), bootstrap=False, seconds=time.perf_counter() - start,
        metrics=metrics, checkpoint=checkpoint, metrics_path=str(out / METRICS_NAME) if out is not None else None,
        extra={"members_mode": "shallow", "device": str(target), "epochs": stage1.epochs + nll_epochs,
               "nll": stage2},
    )
    if out is not None:
        _write_json(result.to_dict(), out / METRICS_NAME)
    return result
