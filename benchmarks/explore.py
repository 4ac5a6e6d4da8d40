"""Exploration engines on the same walkers, in one process: MD throughput and MD overhead over the model.

    python benchmarks/explore.py [--device cpu|cuda] [--quick] [--json rows.json] [--threads 2] [--ipi]
                                 [--models schnet mace] [--sizes 8x108 64x108 1x2048] [--steps 20]

Engines: ``ase-lockstep`` (ASE integrators, a thread per walker, one batched committee call per
step), ``ase-sequential`` (the walkers one after another), ``batched`` (alflow.explore.batched:
every walker in one device batch) and, with ``--ipi``, ``ipi`` (i-PI servers + one driver).
Walkers: NVT Langevin at 300 K, 2 fs, a frame every 10 steps, rattled fcc Cu (a = 3.61 Å) cells
of the given size; committees of 4 members with default hyperparameters (cutoff 5 Å, float32),
per-atom outputs scaled down so that the untrained models give a bound crystal.

Per row: ``atom_steps_per_s`` = walkers × atoms / (time per MD step of all walkers), and
``step_over_model`` = (time per MD step) / (time of the committee call alone on the same batch,
measured in the same run). For ``batched`` and ``ase-lockstep``, which call the committee once per
step on the whole batch, the committee calls are timed inside the same runs (synchronised
wall time of each call: the load drift of a shared machine cancels); for ``ase-sequential`` and
``ipi`` it is the full-batch call (energy + forces, graph built beforehand) timed just before and
after the runs (``model_s_external``, also given for the others).
Time per MD step is measured from two runs of ``s0`` and ``s0 + steps`` steps
(t(s0 + steps) - t(s0)) / steps, so start-up (model transfer, first evaluation, thermalisation,
threads) is not counted. The model time is the mean of two medians of ``--repeats`` calls, taken just
before and just after the engine's runs (on a loaded machine the load drifts; this cancels it to
first order).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alflow import keys  # noqa: E402
from alflow.explore.ase_md import WalkerSpec, run_walkers  # noqa: E402
from alflow.explore.batched import run_batched  # noqa: E402
from alflow.graph import atoms_to_batch  # noqa: E402
from potentials.committee import Committee  # noqa: E402

CUTOFF = 5.0


def cu_cell(n_atoms: int, seed: int):
    """A rattled fcc Cu cell of ``n_atoms`` (4 n³ atoms: 108 = 3³·4, 256 = 4³·4, 2048 = 8³·4)."""
    n = round((n_atoms / 4) ** (1 / 3))
    if 4 * n**3 != n_atoms:
        raise SystemExit(f"--sizes: {n_atoms} atoms is not 4 n^3 (fcc cubic cells); use 108, 256, 500, 864, 2048, ...")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    atoms.rattle(0.02, seed=seed)
    return atoms


class Timed(torch.nn.Module):
    """The committee, timing each of its calls (synchronised): the model-alone time inside an engine's run."""

    def __init__(self, inner: Committee, device: str) -> None:
        super().__init__()
        self.inner = inner
        self.cutoff = inner.cutoff
        self.alpha = inner.alpha
        self.device_name = device
        self.seconds, self.calls = 0.0, 0

    def forward(self, batch, **kwargs):
        sync(self.device_name)
        start = time.perf_counter()
        out = self.inner(batch, **kwargs)
        sync(self.device_name)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def committee(name: str, device: str) -> Committee:
    model = Committee.build(name, 4, species=["Cu"], cutoff=CUTOFF, seed=0)
    for member in model.members:
        member.scale.fill_(0.05)
    return model.to(device).eval()


def specs(walkers: int, atoms: int, steps: int) -> list[WalkerSpec]:
    return [WalkerSpec(atoms=cu_cell(atoms, seed=k), ensemble="nvt-langevin", temperature=300.0, timestep=2.0,
                       steps=steps, stride=10, seed=k, name=f"w{k:03d}") for k in range(walkers)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_seconds(model: Committee, walkers: int, atoms: int, device: str, repeats: int) -> float:
    """Median time of one committee call (energy + forces) on the batch of all walkers' structures."""
    frames = [s.atoms for s in specs(walkers, atoms, 1)]
    dtype = next(model.parameters()).dtype
    batch = atoms_to_batch(frames, CUTOFF, dtype=dtype, device=device)
    times = []
    for k in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        out = model(batch, forces=True, stress=False)
        out[keys.FORCES].sum().item()
        sync(device)
        if k:  # the first call warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_engine(engine: str, model: Committee, walkers: int, atoms: int, steps: int, device: str, workdir: Path,
               model_path: Path | None = None) -> tuple[float, float]:
    """(wall time, time inside committee calls) of running ``walkers`` walkers for ``steps`` steps with ``engine``."""
    model = Timed(model, device)
    walker_specs = specs(walkers, atoms, steps)
    rules = dict(upper=1e9, patience=10**9, min_distance=0.5, progress=False)
    out = Path(tempfile.mkdtemp(dir=workdir))
    sync(device)
    start = time.perf_counter()
    if engine == "batched":
        results = run_batched(walker_specs, model, out, device=device, **rules)
    elif engine == "ase-lockstep":
        results = run_walkers(walker_specs, model, out, device=device, **rules)
    elif engine == "ase-sequential":
        results = run_walkers(walker_specs, model, out, device=device, batched=False, **rules)
    elif engine == "ipi":
        from alflow.explore.ipi import IPIRunSpec, run_ipi_walkers
        from alflow.explore.ipi_driver import StopRules

        ipi_specs = [IPIRunSpec(atoms=s.atoms, ensemble="nvt-langevin", temperature=300.0, timestep=2.0, steps=steps,
                                stride=10, friction=0.01, seed=k + 1, name=s.name) for k, s in enumerate(walker_specs)]
        results = run_ipi_walkers(ipi_specs, model_path, out, rules=StopRules(min_distance=0.5), device=device)
    else:
        raise ValueError(engine)
    sync(device)
    seconds = time.perf_counter() - start
    bad = [r for r in results if r.status != "DONE"]
    if bad:
        raise RuntimeError(f"{engine}: walker {bad[0].name} ended {bad[0].status}: {bad[0].message[:300]}")
    return seconds, model.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps (the CPU rows in < 3 min)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--ipi", action="store_true", help="also the i-PI engine (needs i-pi)")
    parser.add_argument("--models", nargs="+", help="committee architectures (default: schnet, and mace if installed)")
    parser.add_argument("--sizes", nargs="+", help="WALKERSxATOMS, e.g. 8x108 64x108 1x2048")
    parser.add_argument("--engines", nargs="+", help="subset of ase-lockstep ase-sequential batched ipi")
    parser.add_argument("--steps", type=int, help="timed MD steps per run (default 20, quick 10)")
    parser.add_argument("--repeats", type=int, default=3, help="model-only calls timed (median), before and after")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    models = args.models or (["schnet"] + (["mace"] if importlib.util.find_spec("mace") else []))
    if args.sizes:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
    elif args.quick:
        sizes = [(8, 108), (1, 2048)]
    elif device.startswith("cuda"):
        sizes = [(8, 108), (64, 108), (64, 256), (1, 2048)]
    else:
        sizes = [(8, 108), (64, 108), (1, 2048)]
    steps = args.steps or (10 if args.quick else 20)
    s0 = 3
    engines = args.engines or (["ase-lockstep", "ase-sequential", "batched"] + (["ipi"] if args.ipi else []))
    load = os.getloadavg()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, device {device}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in models:
            if name == "mace" and args.quick:
                run_sizes = sizes[:1]
            else:
                run_sizes = sizes
            model = committee(name, device)
            model_path = None
            if "ipi" in engines:
                import potentials

                model_path = workdir / f"{name}.pt"
                potentials.save(model.cpu(), model_path)
                model.to(device)
            for walkers, atoms in run_sizes:
                for engine in engines:
                    if engine.startswith("ase") and walkers * atoms * steps > 64 * 108 * 20 and args.quick:
                        continue
                    # the model alone before and after the engine's two runs: load drifts cancel to first order
                    before = model_seconds(model, walkers, atoms, device, args.repeats)
                    t0, m0 = run_engine(engine, model, walkers, atoms, s0, device, workdir, model_path)
                    t1, m1 = run_engine(engine, model, walkers, atoms, s0 + steps, device, workdir, model_path)
                    t_external = 0.5 * (before + model_seconds(model, walkers, atoms, device, args.repeats))
                    step = max(t1 - t0, 1e-9) / steps
                    # engines that call the committee once per step on the whole batch: the model time inside
                    # the same runs (immune to load drift); the others: the full-batch call timed around the runs
                    inside = engine in ("batched", "ase-lockstep")
                    t_model = max(m1 - m0, 1e-9) / steps if inside else t_external
                    row = {"engine": engine, "device": device, "model": f"{name}-4", "walkers": walkers, "atoms": atoms,
                           "steps": steps, "run_s": [round(t0, 3), round(t1, 3)], "step_s": round(step, 5),
                           "model_s": round(t_model, 5), "model_s_external": round(t_external, 5),
                           "model_timed": "inside the runs" if inside else "before/after the runs",
                           "atom_steps_per_s": round(walkers * atoms / step, 1),
                           "step_over_model": round(step / t_model, 3), "threads": args.threads,
                           "load": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(f"{engine:15s} {row['model']:9s} {walkers:3d} x {atoms:5d}  step {step * 1e3:9.1f} ms  "
                          f"model {t_model * 1e3:9.1f} ms  step/model {row['step_over_model']:6.3f}  "
                          f"{row['atom_steps_per_s']:11.1f} atom-steps/s  (runs {t0:.1f} s, {t1:.1f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
