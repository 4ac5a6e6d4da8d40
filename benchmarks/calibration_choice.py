"""Which calibration map: scale or isotonic, global or per element, with or without recency weights?

Reads the labelled frames of finished iterations of alflow runs (``iter_*/label/predictions.extxyz``: the
committee's mean forces and raw per-atom deviations at selection time; the labels from ``dataset/``) and
scores each map on held-out frames two ways:

* temporal (what the loop does): for every iteration t >= 1, fit on the iterations before t, evaluate on t;
* random: frames of all iterations split in halves (5 random splits), fit on one, evaluate on the other.

Metrics (alflow.calibration): Gaussian NLL per atom (nats, lower is better), miscalibration area (0 is
perfect), Spearman rank correlation of deviation and error (atoms), and RMS err / RMS c over the test atoms
(1: calibrated in mean square; > 1: large errors under-predicted).

    python benchmarks/calibration_choice.py RUN_DIR [RUN_DIR ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from alflow import calibration as cal
from alflow.data import Dataset
from alflow.explore.frames import ALPHA
from alflow.io import frame_hash
from alflow.keys import FORCE_DEVIATION, FRAME_HASH, PRED_FORCES, REF_FORCES

VARIANTS = {  # name: (kind, min_atoms (huge = global only), decay)
    "global scale": ("scale", 10**9, 1.0),
    "per-element scale": ("scale", 20, 1.0),
    "per-element scale, decay 0.5": ("scale", 20, 0.5),
    "global isotonic": ("isotonic", 10**9, 1.0),
    "per-element isotonic": ("isotonic", 20, 1.0),
    "per-element isotonic, decay 0.5": ("isotonic", 20, 0.5),
}


def run_pairs(run_dir: Path) -> list[dict[str, np.ndarray]]:
    """Per-iteration per-atom pairs of the labelled frames of one run."""
    import ase.io

    labels = {a.info[FRAME_HASH]: a for a in Dataset(run_dir / "dataset").frames()}
    out = []
    for label_dir in sorted(run_dir.glob("iter_*/label")):
        path = label_dir / "predictions.extxyz"
        if not path.is_file():
            path = label_dir.parent / "select" / "predictions.extxyz"
        if not path.is_file():
            continue
        it = int(label_dir.parent.name.split("_")[1])
        raw, err, num, frame = [], [], [], []
        for k, atoms in enumerate(ase.io.read(path, index=":")):
            ref = labels.get(frame_hash(atoms))
            if ref is None:
                continue
            eps = (atoms.arrays[cal.RAW_FORCE_DEVIATION] if cal.RAW_FORCE_DEVIATION in atoms.arrays
                   else atoms.arrays[FORCE_DEVIATION] / float(atoms.info.get(ALPHA, 1.0)))
            x, e = cal.atom_pairs(atoms.arrays[PRED_FORCES], ref.arrays[REF_FORCES], eps)
            raw.append(x)
            err.append(e)
            num.append(atoms.numbers)
            frame.append(np.full(len(atoms), k))
        if raw:
            out.append({"iteration": it, "raw": np.concatenate(raw), "error": np.concatenate(err),
                        "numbers": np.concatenate(num), "frame": np.concatenate(frame)})
    return out


def _score(cmap: cal.CalibrationMap, test: dict[str, np.ndarray]) -> dict[str, float | None]:
    c = cmap.apply(test["raw"], test["numbers"])
    return {"nll": cal.gaussian_nll(c, test["error"]), "area": cal.miscalibration_area(c, test["error"]),
            "spearman": cal.spearman(c, test["error"]),
            "ms_ratio": float(np.sqrt(np.sum(test["error"] ** 2) / np.sum(c**2)))}


def _concat(parts: list[dict[str, np.ndarray]], weights: list[float]) -> tuple[np.ndarray, ...]:
    return (np.concatenate([p["raw"] for p in parts]), np.concatenate([p["error"] for p in parts]),
            np.concatenate([p["numbers"] for p in parts]),
            np.concatenate([np.full(p["raw"].size, w) for p, w in zip(parts, weights, strict=True)]))


def evaluate(iterations: list[dict[str, np.ndarray]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean metrics per variant, temporal and random splits."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, (kind, min_atoms, decay) in VARIANTS.items():
        temporal = []
        for t in range(1, len(iterations)):
            past = iterations[:t]
            x, y, z, w = _concat(past, [decay ** (t - k) for k in range(t)])
            temporal.append(_score(cal.fit_map(x, y, z, w, kind=kind, min_atoms=min_atoms), iterations[t]))
        rand = []
        frames = [(i, f) for i, it in enumerate(iterations) for f in np.unique(it["frame"])]
        for seed in range(5):
            rng = np.random.default_rng(seed)
            pick = rng.permutation(len(frames))
            halves = [set(map(tuple, np.array(frames)[pick[: len(frames) // 2]].tolist())),
                      set(map(tuple, np.array(frames)[pick[len(frames) // 2:]].tolist()))]
            def part(sel: set) -> list[dict[str, np.ndarray]]:
                out = []
                for i, it in enumerate(iterations):
                    m = np.array([(i, int(f)) in sel for f in it["frame"]])
                    out.append({k: it[k][m] for k in ("raw", "error", "numbers", "frame")})
                return out
            fit, test = part(halves[0]), part(halves[1])
            n = len(iterations)
            x, y, z, w = _concat(fit, [decay ** (n - 1 - k) for k in range(n)])
            tx, ty, tz, _ = _concat(test, [1.0] * n)
            rand.append(_score(cal.fit_map(x, y, z, w, kind=kind, min_atoms=min_atoms),
                               {"raw": tx, "error": ty, "numbers": tz}))
        results[name] = {split: {m: float(np.mean([r[m] for r in rows if r[m] is not None]))
                                 for m in ("nll", "area", "spearman", "ms_ratio")}
                         for split, rows in (("temporal", temporal), ("random", rand)) if rows}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    report = {}
    for run in args.runs:
        iterations = run_pairs(run)
        print(f"\n{run}: {len(iterations)} labelled iterations, "
              f"{sum(np.unique(i['frame']).size for i in iterations)} frames, "
              f"{sum(i['raw'].size for i in iterations)} atoms")
        res = evaluate(iterations)
        report[str(run)] = res
        print(f"{'variant':34s} {'split':9s} {'NLL':>7s} {'area':>6s} {'Spearman':>8s} {'RMS err/c':>9s}")
        for name, splits in res.items():
            for split, m in splits.items():
                print(f"{name:34s} {split:9s} {m['nll']:7.3f} {m['area']:6.3f} {m['spearman']:8.3f} {m['ms_ratio']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
