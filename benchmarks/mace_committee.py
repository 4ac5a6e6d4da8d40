"""MACE committee cost on one structure: the vmapped committee vs the member loop vs one model.

    OMP_NUM_THREADS=2 python benchmarks/mace_committee.py [--members 4] [--atoms 108] [--threads 2] [--rounds 3]

MACE with alflow's default hyperparameters (32x0e + 32x1o, max_ell 3, correlation 3, two
interactions), cutoff 5 Å, float32, energy + forces, on a rattled fcc Cu supercell; the neighbor
list and batch are built once outside the timings. Each variant is timed in the same process,
interleaved round by round (each round ≥ 1 s of calls after one untimed call); the best round is
reported. The first line says how the two committee paths agree (max |ΔF| over members, eV/Å).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from committee import cu_batch, timed  # noqa: E402

from alflow import keys  # noqa: E402
from potentials.base import compute_properties  # noqa: E402
from potentials.committee import Committee  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--atoms", type=int, default=108)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # e3nn's TorchScript notices
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    committee = Committee.build("mace", args.members, ["Cu"], 5.0, seed=0).float().eval()
    looped = Committee(list(committee.members), vectorize=False).eval()
    committee.vectorize = True
    one = committee.members[0]
    batch = cu_batch(args.atoms)
    variants = {
        "one model": lambda: compute_properties(one, batch, forces=True),
        "committee loop": lambda: looped(batch, forces=True),
        "committee vmap": lambda: committee(batch, forces=True),
    }
    delta = float((variants["committee vmap"]()[keys.FORCES_COMM] - variants["committee loop"]()[keys.FORCES_COMM]).abs().max())
    print(f"# MACE committee of {args.members}, {args.atoms} atoms, float32, energy+forces; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; build + first calls "
          f"{time.perf_counter() - start:.0f} s; vmapped path taken: {committee.vectorized}; max |ΔF| vmap vs loop "
          f"{delta:.1e} eV/Å; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn, 1.0))
    best = {name: min(s) for name, s in samples.items()}
    print(f"| atoms | one model (ms) | committee loop (ms) | committee vmap (ms) | loop / one | vmap / one "
          f"| load average at end |\n|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {args.atoms} | {best['one model'] * 1e3:.0f} | {best['committee loop'] * 1e3:.0f} "
          f"| {best['committee vmap'] * 1e3:.0f} | {best['committee loop'] / best['one model']:.2f}× "
          f"| {best['committee vmap'] / best['one model']:.2f}× | {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
    main()
