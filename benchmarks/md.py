"""MD throughput: ASE walkers and i-PI against the bare committee evaluation, in one run.

    python benchmarks/md.py [--sizes 108 500 2048] [--steps 30] [--skip-ipi]

Committee of 4 SchNet models (default hyperparameters, float32) on fcc Cu.
- bare: one ModelEvaluator call (neighbor list + batch + forward/backward) per step;
- ASE walker: run_walkers with one NVT walker; overhead = walker / bare − 1 (target ≤ 10 %);
- i-PI: (time of a 10+N-step run − time of a 10-step run) / N, so start-up cancels; added ms/step
  over bare (target ≤ 1 ms at 108 atoms);
- 8 walkers batched (one committee call per step) vs 8 walkers one after another (target ≥ 2× on CPU).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from ase.build import bulk

import potentials
from alflow.explore.ase_md import WalkerSpec, run_walkers
from alflow.explore.evaluator import ModelEvaluator
from potentials.committee import Committee


def cu(n_atoms: int):
    reps = {108: (3, 3, 3), 500: (5, 5, 5), 2048: (8, 8, 8), 32: (2, 2, 2)}[n_atoms]
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    atoms.rattle(0.02, seed=0)
    return atoms


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[108, 500, 2048])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-ipi", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    committee = Committee.build("schnet", 4, species=["Cu"], cutoff=5.0, seed=0)
    for m in committee.members:
        m.scale.fill_(0.05)
    evaluator = ModelEvaluator(committee, device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="alflow-md-bench-"))
    potentials.save(committee, tmp / "committee.pt")
    print(f"# MD throughput — {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}, {time.strftime('%Y-%m-%d')}")
    print("| atoms | bare committee (ms/step) | ASE walker (ms/step) | ASE overhead | i-PI (ms/step) | i-PI added (ms/step) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        atoms = cu(n)
        steps = max(5, args.steps * 108 // n)
        bare = best(lambda: evaluator([atoms]), 3)
        spec = WalkerSpec(atoms=atoms, ensemble="nvt-langevin", temperature=300, steps=steps, stride=10, name="b")
        t = time.perf_counter()
        run_walkers([spec], evaluator, tmp / f"ase{n}", upper=1e9, progress=False)
        walker = (time.perf_counter() - t) / (steps + 1)
        ipi_cell, added = "—", "—"
        if not args.skip_ipi and n <= 500:
            from alflow.explore.ipi import IPIRunSpec, run_ipi

            times = {}
            for k in (10, 10 + steps):
                t = time.perf_counter()
                r = run_ipi(IPIRunSpec(atoms=atoms, ensemble="nvt-svr", steps=k, stride=k, name=f"i{k}"),
                            tmp / "committee.pt", tmp / f"ipi{n}-{k}", device=args.device, wall_seconds=600)
                assert r.status == "DONE", r.message
                times[k] = time.perf_counter() - t
            per_step = (times[10 + steps] - times[10]) / steps
            ipi_cell, added = f"{per_step * 1e3:.1f}", f"{(per_step - bare) * 1e3:+.1f}"
        print(f"| {n} | {bare * 1e3:.1f} | {walker * 1e3:.1f} | {walker / bare - 1:+.0%} | {ipi_cell} | {added} |", flush=True)

    atoms = cu(108)
    specs = [WalkerSpec(atoms=atoms, ensemble="nvt-langevin", temperature=300 + 100 * k, steps=args.steps, stride=10, seed=k,
                        name=f"w{k}") for k in range(8)]
    t = time.perf_counter()
    run_walkers(specs, evaluator, tmp / "batched", upper=1e9, progress=False)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    run_walkers(specs, evaluator, tmp / "sequential", upper=1e9, progress=False, batched=False)
    sequential = time.perf_counter() - t
    print()
    print("| 8 walkers × 108 atoms | batched (s) | one after another (s) | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| {args.steps} steps each | {batched:.1f} | {sequential:.1f} | {sequential / batched:.1f}× |")


if __name__ == "__main__":
    main()
