"""Recalibration of the committee's force deviation against true errors, every iteration; numpy in, numpy out.

Data: per-atom pairs (raw deviation ε_i, true error |ΔF_i|) with the atom's element Z_i and a weight.
ε_i = sqrt(mean_k ||F_i^k − <F_i>||²) is the *uncalibrated* (α = 1) DP-GEN force deviation (eV/Å) and
|ΔF_i| = ||<F_i> − F_ref,i|| the committee mean's force error (eV/Å) once the oracle labelled the frame.
The loop collects them from the validation frames of each new committee and from every frame labelled
so far (with the predictions made at selection time), weighted by ``decay ** age`` (age in iterations).

Model: each Cartesian error component ~ N(0, c_i²/3) with c_i = g(ε_i, Z_i) the calibrated deviation, so
E|ΔF_i|² = c_i². Two maps g (``committee.calibration``):

* ``scale``: c_i = α_Z ε_i, per element, maximum likelihood α_Z² = Σ w |ΔF|²/ε² / Σ w (Musil et al., JCTC
  15, 906 (2019), per atom instead of per component); elements with fewer than ``min_atoms`` atoms use the
  global α fitted on every atom.
* ``isotonic``: c_i = sqrt(m_Z(ε_i)) with m_Z the weighted isotonic (non-decreasing) regression of |ΔF|² on
  ε (pool-adjacent-violators), linear between block centres and proportional to ε beyond them.

Metrics (:func:`metrics`): Spearman rank correlation of c and |ΔF|, Gaussian negative log-likelihood per atom
(three components, σ = c/√3), miscalibration area (mean |observed − expected| fraction of atoms with
|ΔF|²/σ² below the χ²₃ quantile, over expected fractions 0.01..0.99), and the coverage of the trust window
(:func:`coverage`: of the frames whose calibrated max deviation is below ``lower``, the fraction whose true max
force error is below the target).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KINDS", "CalibrationMap", "fit_map", "recency_weights", "metrics", "coverage", "spearman",
           "miscalibration_area", "gaussian_nll", "isotonic_fit", "atom_pairs", "committee_pairs",
           "read_pairs", "write_pairs", "FILE", "PAIRS_FILE", "RAW_FORCE_DEVIATION", "RAW_MAX_FORCE_DEVIATION"]

KINDS = ("scale", "isotonic")
FILE = "calibration.json"  # the fitted map, next to each iteration's committee.pt
PAIRS_FILE = "calibration_pairs.json"  # per-atom pairs of the frames labelled in an iteration
RAW_FORCE_DEVIATION = "raw_force_deviation"  # arrays: ε_i at α = 1 (eV/Å), set at selection
RAW_MAX_FORCE_DEVIATION = "raw_max_force_deviation"  # info: max_i ε_i at α = 1 (eV/Å)


def _arrays(raw: Any, error: Any, numbers: Any, weights: Any = None) -> tuple[np.ndarray, ...]:
    x = np.asarray(raw, dtype=float).reshape(-1)
    y = np.asarray(error, dtype=float).reshape(-1)
    z = np.asarray(numbers, dtype=int).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float).reshape(-1)
    if not (x.shape == y.shape == z.shape == w.shape):
        raise ValueError(f"raw/error/numbers/weights: expected one entry per atom each, got sizes "
                         f"{x.size}, {y.size}, {z.size}, {w.size}")
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (x > 0) & (w > 0)
    return x[ok], y[ok], z[ok], w[ok]


def isotonic_fit(x: Any, y: Any, w: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted isotonic (non-decreasing) regression of y on x by pool-adjacent-violators.

    Returns knots (x_k, y_k): the weighted mean x and the fitted y of each block, both non-decreasing.
    """
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=float).reshape(-1)
    if x.size == 0:
        raise ValueError("isotonic_fit: expected at least one point, got none")
    order = np.argsort(x, kind="stable")
    x, y, w = x[order], y[order], w[order]
    val, wt, xs, cnt = [], [], [], []  # block means of y, weights, weighted sums of x, sizes
    for xi, yi, wi in zip(x, y, w, strict=True):
        val.append(yi)
        wt.append(wi)
        xs.append(xi * wi)
        cnt.append(1)
        while len(val) > 1 and val[-2] >= val[-1]:
            v2, w2, s2 = val.pop(), wt.pop(), xs.pop()
            c2 = cnt.pop()
            total = wt[-1] + w2
            val[-1] = (val[-1] * wt[-1] + v2 * w2) / total
            wt[-1], xs[-1], cnt[-1] = total, xs[-1] + s2, cnt[-1] + c2
    kx = np.array(xs) / np.array(wt)
    return kx, np.array(val)


@dataclass
class CalibrationMap:
    """A fitted map from raw per-atom force deviation ε (eV/Å) and element Z to the calibrated deviation.

    ``alpha`` is the global scale (also stored on the committee, so engines compute α-scaled scores);
    ``alphas`` the per-element scales (``scale``) and ``knots`` the per-element isotonic knots
    (``isotonic``: ε and c, eV/Å; key 0 = every element). JSON-serialisable (:meth:`to_dict`).
    """

    kind: str = "scale"
    alpha: float = 1.0
    alphas: dict[int, float] = field(default_factory=dict)
    knots: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    n_atoms: dict[int, int] = field(default_factory=dict)
    n_frames: int = 0
    note: str | None = None

    def element_scales(self, numbers: Any) -> np.ndarray:
        """Per-atom α: the element's scale, or the global one."""
        z = np.asarray(numbers, dtype=int).reshape(-1)
        return np.array([self.alphas.get(int(k), self.alpha) for k in z], dtype=float)

    def apply(self, raw: Any, numbers: Any) -> np.ndarray:
        """Calibrated per-atom deviation (eV/Å) from raw ε (α = 1, eV/Å) and atomic numbers."""
        x = np.asarray(raw, dtype=float).reshape(-1)
        z = np.asarray(numbers, dtype=int).reshape(-1)
        if x.shape != z.shape:
            raise ValueError(f"raw/numbers: expected one entry per atom each, got {x.size} and {z.size}")
        if self.kind == "scale" or not self.knots:
            return x * self.element_scales(z)
        out = np.empty_like(x)
        for element in np.unique(z):
            sel = z == element
            kx, ky = self.knots.get(int(element), self.knots.get(0, ([1.0], [self.alpha])))
            out[sel] = _isotonic_apply(x[sel], np.asarray(kx), np.asarray(ky))
        return out

    def max_deviation(self, raw: Any, numbers: Any) -> float:
        """Calibrated max_i of one structure (eV/Å); 0 without atoms."""
        c = self.apply(raw, numbers)
        return float(c.max()) if c.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha": self.alpha, "alphas": {str(k): v for k, v in self.alphas.items()},
                "knots": {str(k): [list(map(float, kx)), list(map(float, ky))] for k, (kx, ky) in self.knots.items()},
                "n_atoms": {str(k): v for k, v in self.n_atoms.items()}, "n_frames": self.n_frames,
                "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationMap:
        kind = d.get("kind", "scale")
        if kind not in KINDS:
            raise ValueError(f"calibration kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        return cls(kind=kind, alpha=float(d.get("alpha", 1.0)),
                   alphas={int(k): float(v) for k, v in (d.get("alphas") or {}).items()},
                   knots={int(k): (list(v[0]), list(v[1])) for k, v in (d.get("knots") or {}).items()},
                   n_atoms={int(k): int(v) for k, v in (d.get("n_atoms") or {}).items()},
                   n_frames=int(d.get("n_frames", 0)), note=d.get("note"))

    def save(self, path: str | Path) -> Path:
        from alflow.fileio import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationMap:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _isotonic_apply(x: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """sqrt of the isotonic m(ε) at x: linear between knots, proportional to ε beyond them (monotone)."""
    c = np.sqrt(np.maximum(ky, 0.0))
    out = np.interp(x, kx, c)
    hi, lo = x > kx[-1], x < kx[0]
    if kx[-1] > 0:
        out[hi] = c[-1] * x[hi] / kx[-1]
    if kx[0] > 0:
        out[lo] = c[0] * x[lo] / kx[0]
    return out


def recency_weights(age: Any, decay: float) -> np.ndarray:
    """Weight decay**age of data ``age`` iterations old (age 0: the newest committee; decay in (0, 1])."""
    return float(decay) ** np.asarray(age, dtype=float)


def fit_map(raw: Any, error: Any, numbers: Any, weights: Any = None, *, kind: str = "scale",
            min_atoms: int = 20, n_frames: int = 0) -> CalibrationMap:
    """Fit the map from raw per-atom deviations ε to true per-atom errors |ΔF| (both eV/Å).

    Per element with at least ``min_atoms`` atoms, the global fit otherwise. ``kind``: ``scale`` or
    ``isotonic`` (module docstring). Atoms with ε = 0 or non-finite values are left out; raises
    ValueError when none is left.
    """
    if kind not in KINDS:
        raise ValueError(f"committee.calibration: expected one of {', '.join(KINDS)}, got {kind!r}")
    x, y, z, w = _arrays(raw, error, numbers, weights)
    if x.size == 0:
        raise ValueError("no atom with a positive, finite committee deviation to calibrate on")
    ratio = y**2 / x**2
    alpha = float(np.sqrt(np.sum(w * ratio) / np.sum(w)))
    out = CalibrationMap(kind=kind, alpha=alpha, n_frames=int(n_frames))
    for element in np.unique(z):
        sel = z == element
        out.n_atoms[int(element)] = int(sel.sum())
        if sel.sum() >= int(min_atoms):
            out.alphas[int(element)] = float(np.sqrt(np.sum(w[sel] * ratio[sel]) / np.sum(w[sel])))
    if kind == "isotonic":
        kx, ky = isotonic_fit(x, y**2, w)
        out.knots[0] = (kx.tolist(), ky.tolist())
        for element in out.alphas:
            sel = z == element
            kx, ky = isotonic_fit(x[sel], y[sel] ** 2, w[sel])
            out.knots[element] = (kx.tolist(), ky.tolist())
    return out


# ----------------------------------------------------------------------------- metrics

def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, dtype=float)
    ranks[order] = np.arange(a.size, dtype=float)
    # average ranks of ties
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Any, b: Any) -> float | None:
    """Spearman rank correlation (ties averaged); None with fewer than 3 points or a constant input."""
    a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _chi2_3_cdf(q: np.ndarray) -> np.ndarray:
    """CDF of χ² with 3 degrees of freedom: erf(sqrt(q/2)) − sqrt(2q/π) exp(−q/2)."""
    q = np.maximum(np.asarray(q, dtype=float), 0.0)
    erf = np.vectorize(math.erf)
    return erf(np.sqrt(q / 2)) - np.sqrt(2 * q / np.pi) * np.exp(-q / 2)


def miscalibration_area(calibrated: Any, error: Any) -> float | None:
    """Mean over p = 0.01..0.99 of |observed − p|: observed = fraction of atoms with χ²₃ CDF of 3|ΔF|²/c² ≤ p."""
    c, e = np.asarray(calibrated, dtype=float).reshape(-1), np.asarray(error, dtype=float).reshape(-1)
    ok = (c > 0) & np.isfinite(c) & np.isfinite(e)
    if not ok.any():
        return None
    u = _chi2_3_cdf(3 * e[ok] ** 2 / c[ok] ** 2)  # probability integral transform: uniform if calibrated
    p = np.linspace(0.01, 0.99, 99)
    observed = (u[None, :] <= p[:, None]).mean(axis=1)
    return float(np.mean(np.abs(observed - p)))


def gaussian_nll(calibrated: Any, error: Any) -> float | None:
    """Mean per atom of the 3-component Gaussian NLL with σ = c/√3: 1.5 ln(2πσ²) + |ΔF|²/(2σ²) (nats)."""
    c, e = np.asarray(calibrated, dtype=float).reshape(-1), np.asarray(error, dtype=float).reshape(-1)
    ok = (c > 0) & np.isfinite(c) & np.isfinite(e)
    if not ok.any():
        return None
    s2 = c[ok] ** 2 / 3
    return float(np.mean(1.5 * np.log(2 * np.pi * s2) + e[ok] ** 2 / (2 * s2)))


def coverage(max_deviation: Any, max_error: Any, lower: float, target: float) -> tuple[float | None, int]:
    """Of the frames with calibrated max deviation < ``lower`` (eV/Å), the fraction with true max error
    < ``target`` (eV/Å), and how many such frames there were (None when none)."""
    d, e = np.asarray(max_deviation, dtype=float).reshape(-1), np.asarray(max_error, dtype=float).reshape(-1)
    trusted = d < float(lower)
    n = int(trusted.sum())
    return (float(np.mean(e[trusted] < float(target))) if n else None), n


def metrics(raw: Any, error: Any, numbers: Any, frame: Any, cmap: CalibrationMap | None, lower: float,
            target: float) -> dict[str, Any]:
    """Calibration metrics of per-atom pairs before (α = 1) and after ``cmap``; JSON-ready dict.

    ``frame``: per-atom frame index, for the frame-level Spearman and the trust-window coverage.
    """
    x, y = np.asarray(raw, float).reshape(-1), np.asarray(error, float).reshape(-1)
    z, f = np.asarray(numbers, int).reshape(-1), np.asarray(frame, int).reshape(-1)
    out: dict[str, Any] = {"n_atoms": int(x.size), "n_frames": int(np.unique(f).size)}
    for tag, c in (("raw", x), ("calibrated", cmap.apply(x, z) if cmap is not None else None)):
        if c is None:
            continue
        frames = np.unique(f)
        dmax = np.array([c[f == k].max() for k in frames]) if frames.size else np.zeros(0)
        emax = np.array([y[f == k].max() for k in frames]) if frames.size else np.zeros(0)
        cov, n_trusted = coverage(dmax, emax, lower, target)
        out[tag] = {"spearman": spearman(c, y), "spearman_frames": spearman(dmax, emax),
                    "miscalibration_area": miscalibration_area(c, y), "nll": gaussian_nll(c, y),
                    "coverage": cov, "n_trusted": n_trusted}
    return out


# ----------------------------------------------------------------------------- pairs

def atom_pairs(pred_forces: Any, ref_forces: Any, raw_deviation: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ε_i, |ΔF_i|) of one frame: raw deviation (N,) and ||<F_i> − F_ref,i|| (N,), eV/Å."""
    diff = np.asarray(pred_forces, float).reshape(-1, 3) - np.asarray(ref_forces, float).reshape(-1, 3)
    return np.asarray(raw_deviation, float).reshape(-1), np.linalg.norm(diff, axis=1)


def committee_pairs(committee: Any, frames: Sequence[Any], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per-atom pairs of labelled ``frames`` under ``committee`` at α = 1: raw, error, numbers, frame."""
    from alflow import keys  # the graph import below pulls in torch: lazy, the rest is numpy only
    from alflow.graph import atoms_to_batch

    param = next(committee.parameters())
    raw, err, num, idx = [], [], [], []
    frames = list(frames)
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        batch = atoms_to_batch(chunk, committee.cutoff, dtype=param.dtype, device=param.device, labels=True)
        out = committee(batch, forces=True, stress=False, calibrated=False)
        fvar = out[keys.FORCES_VAR].detach().cpu().numpy()
        mean = out[keys.FORCES].detach().cpu().numpy()
        ref = batch[keys.REF_FORCES].detach().cpu().numpy()
        which = batch[keys.BATCH].detach().cpu().numpy()
        eps, e = atom_pairs(mean, ref, np.sqrt(fvar.sum(axis=1)))
        raw.append(eps)
        err.append(e)
        num.append(batch[keys.NUMBERS].detach().cpu().numpy())
        idx.append(which + start)
    if not raw:
        return {"raw": np.zeros(0), "error": np.zeros(0), "numbers": np.zeros(0, int), "frame": np.zeros(0, int)}
    return {"raw": np.concatenate(raw), "error": np.concatenate(err), "numbers": np.concatenate(num),
            "frame": np.concatenate(idx)}


def write_pairs(path: str | Path, pairs: dict[str, Any], iteration: int) -> Path:
    """Per-atom pairs as JSON (``raw``, ``error`` eV/Å, ``numbers``, ``frame``, and the ``iteration``)."""
    from alflow.fileio import atomic_write_text

    data = {"iteration": int(iteration), **{k: np.asarray(v).tolist() for k, v in pairs.items()}}
    path = Path(path)
    atomic_write_text(path, json.dumps(data))
    return path


def read_pairs(path: str | Path) -> dict[str, Any]:
    d = json.loads(Path(path).read_text())
    return {"iteration": int(d["iteration"]), "raw": np.asarray(d["raw"], float), "error": np.asarray(d["error"], float),
            "numbers": np.asarray(d["numbers"], int), "frame": np.asarray(d["frame"], int)}


def recalibrate(committee: Any, valid_frames: Sequence[Any], history: Sequence[dict[str, Any]], iteration: int, *,
                kind: str = "scale", decay: float = 0.5, min_atoms: int = 20, min_frames: int = 1,
                lower: float = 0.05, target: float | None = None) -> tuple[CalibrationMap, dict[str, Any]]:
    """Fit the map of iteration ``iteration``'s committee and store its global α on the committee.

    Data: the committee's own ``valid_frames`` (age 0, evaluated here at α = 1) and the ``history`` of
    per-atom pairs labelled in earlier iterations (:func:`read_pairs`; age = iteration − their iteration),
    weighted ``decay ** age``. With fewer than ``min_frames`` frames in all, or no usable atom, α = 1 and
    the map's ``note`` says why. Returns the map and a JSON-ready record (map, data sizes, metrics on the
    validation frames before/after: in-sample, and the trust-window coverage with ``target``, default ``lower``).
    """
    target = float(lower if target is None else target)
    valid = committee_pairs(committee, valid_frames) if valid_frames else None
    parts = [] if valid is None or valid["raw"].size == 0 else [(valid, 0)]
    parts += [(h, iteration - int(h["iteration"])) for h in history if int(h["iteration"]) < iteration]
    n_frames = sum(int(np.unique(p["frame"]).size) for p, _ in parts)
    record: dict[str, Any] = {"n_valid_frames": len(valid_frames), "n_history_frames": n_frames - (
        int(np.unique(valid["frame"]).size) if valid is not None and valid["raw"].size else 0),
        "decay": float(decay), "target": target}
    cmap: CalibrationMap
    if n_frames < int(min_frames) or not parts:
        cmap = CalibrationMap(kind=kind, note=(f"calibration skipped: {n_frames} labelled frame(s), fewer than "
                                               f"committee.calibration_min_frames = {int(min_frames)}; alpha = 1"))
    else:
        raw = np.concatenate([p["raw"] for p, _ in parts])
        err = np.concatenate([p["error"] for p, _ in parts])
        num = np.concatenate([p["numbers"] for p, _ in parts])
        age = np.concatenate([np.full(p["raw"].size, a, dtype=float) for p, a in parts])
        try:
            cmap = fit_map(raw, err, num, recency_weights(age, decay), kind=kind, min_atoms=min_atoms,
                           n_frames=n_frames)
        except ValueError as exc:
            cmap = CalibrationMap(kind=kind, note=f"calibration skipped: {exc}; alpha = 1")
    committee.set_alpha(cmap.alpha)
    record["map"] = cmap.to_dict()
    if valid is not None and valid["raw"].size:
        record["valid"] = metrics(valid["raw"], valid["error"], valid["numbers"], valid["frame"], cmap, lower, target)
    return cmap, record
