"""Committee (ensemble) uncertainty scores and their calibration; numpy in, numpy out.

A committee of K potentials predicts energies E^k (eV) and forces F_i^k (eV/Å)
for k = 1..K. alflow's definitions (every spread is a *population* statistic over
the K members, ddof = 0, so K = 1 gives zero; norms are Euclidean over x, y, z):

    <F_i>            = (1/K) Σ_k F_i^k                                    mean force (eV/Å)
    forces_var[i,a]  = α² (1/K) Σ_k (F_ia^k - <F_ia>)²                    per component (eV²/Å²)
    eps_i            = α sqrt( (1/K) Σ_k ||F_i^k - <F_i>||² )             force deviation (eV/Å)
                     = sqrt( Σ_a forces_var[i,a] )
    max_force_deviation        = max_i eps_i                              (eV/Å)
    energy_var                 = α² (1/K) Σ_k (E^k - <E>)²                 (eV²)
    energy_deviation_per_atom  = α sqrt((1/K) Σ_k (E^k - <E>)²) / N         (eV/atom)

eps_i and max_i eps_i are DP-GEN's model deviation (Zhang et al., Comput. Phys.
Commun. 253, 107206 (2020); deepmd-kit ``calc_model_devi_f``: np.std over models,
ddof = 0, then the norm over xyz); the energy deviation per atom is deepmd-kit's
``calc_model_devi_e`` on E/N. α is the calibration factor (1 = uncalibrated): it
scales every member's deviation from the mean (as i-PI's committee ``alpha``), so
variances scale by α² and deviations by α; means are unchanged.

Calibration (:func:`fit_alpha`) follows Musil, Willatt, Langovoy & Ceriotti,
"Fast and accurate uncertainty estimation in chemical machine learning",
J. Chem. Theory Comput. 15, 906 (2019), and Imbalzano et al., J. Chem. Phys. 154,
074102 (2021): see ``docs/uncertainty.md``.

This module imports no torch; :func:`calibrate_committee` imports it lazily to run
the committee on the validation frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from alflow import keys

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms

__all__ = [
    "force_deviation",
    "max_force_deviation",
    "energy_deviation_per_atom",
    "energy_var",
    "forces_var",
    "scores",
    "fit_alpha",
    "calibrate_committee",
    "calibrate_if_enough",
    "CALIBRATION_TARGETS",
]

CALIBRATION_TARGETS = ("forces", "energy", "both")


def _forces_comm(forces_comm: Any) -> np.ndarray:
    f = np.asarray(forces_comm, dtype=float)
    if f.ndim != 3 or f.shape[-1] != 3 or f.shape[0] < 1:
        raise ValueError(f"forces_comm: expected shape (K, N, 3) with K >= 1 members, got {f.shape}")
    return f


def _alpha(alpha: float) -> float:
    a = float(alpha)
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f"alpha: expected a positive finite calibration factor, got {alpha!r}")
    return a


def forces_var(forces_comm: Any, alpha: float = 1.0) -> np.ndarray:
    """(N, 3) α² × population variance (ddof = 0) over the K members of each force component, eV²/Å²."""
    f = _forces_comm(forces_comm)
    return _alpha(alpha) ** 2 * np.var(f, axis=0, ddof=0)


def force_deviation(forces_comm: Any, alpha: float = 1.0) -> np.ndarray:
    """(N,) eps_i = α sqrt(mean_k ||F_i^k - <F_i>||²) in eV/Å: DP-GEN's per-atom force deviation (ddof = 0, L2 over xyz)."""
    return np.sqrt(forces_var(forces_comm, alpha).sum(axis=-1))


def max_force_deviation(forces_comm: Any, alpha: float = 1.0) -> float:
    """max_i eps_i (eV/Å), DP-GEN's ``max_devi_f``; 0 for a structure without atoms."""
    eps = force_deviation(forces_comm, alpha)
    return float(eps.max()) if eps.size else 0.0


def energy_var(energies: Any, alpha: float = 1.0) -> float:
    """α² × population variance (ddof = 0) of the K member energies (K,), eV²."""
    e = np.asarray(energies, dtype=float).reshape(-1)
    if e.size < 1:
        raise ValueError("energies: expected K >= 1 member energies, got none")
    return float(_alpha(alpha) ** 2 * np.var(e, ddof=0))


def energy_deviation_per_atom(energies: Any, n_atoms: int, alpha: float = 1.0) -> float:
    """α std_k(E^k) / N in eV/atom, std with ddof = 0 (deepmd-kit ``calc_model_devi_e`` on E/N)."""
    n = int(n_atoms)
    if n < 1:
        raise ValueError(f"n_atoms: expected a positive number of atoms, got {n_atoms!r}")
    return float(np.sqrt(energy_var(energies, alpha)) / n)


def scores(forces_comm: Any, energies: Any, n_atoms: int | None = None, alpha: float = 1.0) -> dict[str, Any]:
    """Every committee score of one structure from the members' forces (K, N, 3) eV/Å and energies (K,) eV.

    Returns ``energy`` (mean, eV), ``forces`` (N, 3) mean, ``energy_var``, ``forces_var`` (N, 3),
    ``force_deviation`` (N,) eps_i, ``max_force_deviation`` and ``energy_deviation_per_atom``, all with
    the definitions of the module docstring (ddof = 0, α-scaled). ``n_atoms`` defaults to N.
    """
    f = _forces_comm(forces_comm)
    e = np.asarray(energies, dtype=float).reshape(-1)
    if e.shape[0] != f.shape[0]:
        raise ValueError(f"energies: expected {f.shape[0]} member energies (one per member of forces_comm), got {e.shape[0]}")
    n = f.shape[1] if n_atoms is None else int(n_atoms)
    fvar = forces_var(f, alpha)
    eps = np.sqrt(fvar.sum(axis=-1))
    return {
        keys.ENERGY: float(e.mean()),
        keys.FORCES: f.mean(axis=0),
        keys.ENERGY_VAR: energy_var(e, alpha),
        keys.FORCES_VAR: fvar,
        "force_deviation": eps,
        keys.MAX_FORCE_DEVIATION: float(eps.max()) if eps.size else 0.0,
        keys.ENERGY_DEVIATION_PER_ATOM: energy_deviation_per_atom(e, n, alpha),
    }


def fit_alpha(predicted_std: Any, true_error: Any, n_members: int | None = None) -> float:
    """Calibration factor α from predicted standard deviations σ and true errors (same shape, same units).

    Default (``n_members=None``): the maximum-likelihood α of the model error ~ N(0, α² σ²),
    treating σ as exact (Musil et al., JCTC 15, 906 (2019)):

        α² = mean(err² / σ²)

    so that the calibrated z-scores err / (α σ) have unit mean square on the validation set.

    With ``n_members=K`` (K >= 4): the small-committee correction of Musil et al. (2019), written out
    in Imbalzano et al., J. Chem. Phys. 154, 074102 (2021), which accounts for σ² itself being
    estimated from K members and for the committee mean differing from the infinite-committee mean:

        α_u² = -1/K + (K - 3)/(K - 1) · mean(err² / s²),    s² = K/(K - 1) σ²  (unbiased, ddof = 1)

    and the returned α is α_u sqrt(K/(K - 1)), so that it multiplies our ddof = 0 σ like the default.
    Entries with σ = 0 (identical members) are an error. Raises ValueError where α² is not positive.
    """
    sigma = np.asarray(predicted_std, dtype=float).reshape(-1)
    err = np.asarray(true_error, dtype=float).reshape(-1)
    if sigma.shape != err.shape:
        raise ValueError(f"true_error: expected as many entries as predicted_std ({sigma.size}), got {err.size}")
    if sigma.size == 0:
        raise ValueError("predicted_std: expected at least one validation value, got none")
    if not (np.isfinite(sigma).all() and np.isfinite(err).all()):
        raise ValueError("predicted_std/true_error: contain NaN or inf")
    if (sigma <= 0).any():
        bad = int(np.count_nonzero(sigma <= 0))
        raise ValueError(
            f"predicted_std: {bad} of {sigma.size} entries are <= 0 (members agree exactly there); "
            "a committee of identical members cannot be calibrated"
        )
    ratio = np.mean(err**2 / sigma**2)
    if n_members is None:
        return float(np.sqrt(ratio))
    k = int(n_members)
    if k < 4:
        raise ValueError(f"n_members: the small-committee correction needs K >= 4 members, got {n_members!r}")
    ratio_unbiased = ratio * (k - 1) / k  # err²/s² with s² = K/(K-1) σ²
    alpha2_unbiased = -1.0 / k + (k - 3) / (k - 1) * ratio_unbiased
    if alpha2_unbiased <= 0:
        raise ValueError(
            f"fit_alpha: the small-committee estimate alpha² = {alpha2_unbiased:.3g} is not positive "
            "(errors much smaller than the committee spread); use n_members=None"
        )
    return float(np.sqrt(alpha2_unbiased * k / (k - 1)))


def calibration_data(results: dict[str, np.ndarray], labels: dict[str, np.ndarray], target: str) -> tuple[np.ndarray, np.ndarray]:
    """(σ, err) pairs for :func:`fit_alpha` from *uncalibrated* committee results and labels.

    forces: every force component, σ = sqrt(forces_var[i,a]), err = F_ref[i,a] - <F>[i,a];
    energy: every structure, σ = sqrt(energy_var), err = E_ref - <E> (both per structure, eV);
    both: the two concatenated.
    """
    if target not in CALIBRATION_TARGETS:
        raise ValueError(f"target: expected one of {', '.join(CALIBRATION_TARGETS)}, got {target!r}")
    sig, err = [], []
    if target in ("forces", "both"):
        sig.append(np.sqrt(np.asarray(results[keys.FORCES_VAR], dtype=float)).reshape(-1))
        err.append((np.asarray(labels[keys.REF_FORCES]) - np.asarray(results[keys.FORCES])).reshape(-1))
    if target in ("energy", "both"):
        sig.append(np.sqrt(np.asarray(results[keys.ENERGY_VAR], dtype=float)).reshape(-1))
        err.append((np.asarray(labels[keys.REF_ENERGY]) - np.asarray(results[keys.ENERGY])).reshape(-1))
    return np.concatenate(sig), np.concatenate(err)


def calibrate_committee(
    committee: Any,
    frames: Sequence[Atoms],
    target: str = "forces",
    small_k_correction: bool = False,
    batch_size: int = 16,
) -> float:
    """Fit α on labelled validation frames, store it on ``committee`` (``committee.set_alpha``) and return it.

    ``frames`` carry ``REF_energy`` in ``info`` and ``REF_forces`` in ``arrays`` (alflow.keys).
    ``target``: "forces" (default: every force component of every frame, the quantity the
    DP-GEN force deviation is built from, and N×3 data points per frame), "energy" (one point per
    frame) or "both". ``small_k_correction`` uses the K-member correction of :func:`fit_alpha`.
    """
    import torch  # lazy: the scores above stay numpy-only

    from alflow.graph import atoms_to_batch

    frames = list(frames)
    if not frames:
        raise ValueError("frames: expected at least one labelled validation frame, got none")
    if target not in CALIBRATION_TARGETS:
        raise ValueError(f"target: expected one of {', '.join(CALIBRATION_TARGETS)}, got {target!r}")
    param = next(committee.parameters())
    sigmas, errors = [], []
    for start in range(0, len(frames), max(int(batch_size), 1)):
        chunk = frames[start : start + max(int(batch_size), 1)]
        batch = atoms_to_batch(chunk, committee.cutoff, dtype=param.dtype, device=param.device, labels=True)
        out = committee(batch, forces=target != "energy", stress=False, calibrated=False)
        results = {k: v.detach().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
        labels = {k: batch[k].detach().cpu().numpy() for k in (keys.REF_ENERGY, keys.REF_FORCES)}
        s, e = calibration_data(results, labels, target)
        sigmas.append(s)
        errors.append(e)
    alpha = fit_alpha(np.concatenate(sigmas), np.concatenate(errors), len(committee.members) if small_k_correction else None)
    committee.set_alpha(alpha)
    return alpha


def calibrate_if_enough(committee: Any, frames: Sequence[Atoms], min_frames: int = 1) -> tuple[float, str | None]:
    """α from validation ``frames`` (forces) when there are at least ``min_frames``; else α = 1 and the reason.

    A data problem (members agreeing exactly) also leaves α = 1 with the reason instead of
    raising. Returns (α, note or None); α is stored on ``committee``. The loop's default is
    ``min_frames = 1``: α from one or two frames is noisy, but α = 1 is worse — small, young
    committees are overconfident by factors of 2–15, and an uncalibrated one declares itself
    accurate too early (docs/uncertainty.md).
    """
    frames = list(frames)
    if len(frames) < int(min_frames):
        committee.set_alpha(1.0)
        return 1.0, (f"calibration skipped: {len(frames)} validation frame(s), fewer than "
                     f"committee.calibration_min_frames = {int(min_frames)}; alpha = 1")
    try:
        return calibrate_committee(committee, frames), None
    except ValueError as err:
        committee.set_alpha(1.0)
        return 1.0, f"calibration skipped: {err}; alpha = 1"
