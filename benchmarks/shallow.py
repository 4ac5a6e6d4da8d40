"""Shallow committee (one trunk, K heads) vs one model vs a full committee of K: cost and calibration.

    python benchmarks/shallow.py cost [--archs schnet painn] [--sizes 108 2048] [--repeats 3] [--threads 1]
    python benchmarks/shallow.py heads [--archs schnet painn] [--sizes 108 2048]
    python benchmarks/shallow.py md [--archs schnet painn] [--sizes 32 108] [--walkers 8] [--steps 100] [--stride 20]
                                    [--engine batched|ase|ipi]
    python benchmarks/shallow.py calibration [--arch schnet] [--epochs 30] [--nll-epochs 20] [--seed 0]

``cost``: energy + forces of rattled fcc Cu (a = 3.61 Å, cutoff 5 Å, float32, default
hyperparameters, K = 4), graph built once outside the timings; variants interleaved round by
round, best of ``--repeats`` rounds (each ≥ 0.3 s), as multiples of one model: the shallow
committee with ``forces_mode`` ``mean`` (one backward pass) and ``heads`` (every head's forces,
one batched VJP), and the full committee's CPU path (K sequential members).

``md``: what exploration pays: the batched MD engine over ``--walkers`` rattled Cu cells at 600 K,
a frame every ``--stride`` steps, per variant as multiples of one model's MD (interleaved rounds,
best of ``--repeats``): the shallow committee in ``heads`` mode as the engine runs it (the heads'
spread only on steps that record a frame), the same with the spread on every step, ``mean`` mode,
and a full committee of K.

``heads``: what the ``mean`` mode adds to one model, measured alone (less exposed to load than
the whole-model ratios): K heads vs one readout, forward + backward on the features.

``calibration``: Cu/EMT, 2×2×2 cubic cells (32 atoms); training frames rattled by 0.02–0.10 Å
with ±2 % strain, held-out frames rattled by 0.02–0.15 Å (``--test-rattle``; some beyond the training data).
Shallow committee (``--epochs`` MSE + ``--nll-epochs`` NLL, K = 4 heads, both force modes from
the same weights) vs a full committee of 4 trained ``--epochs + --nll-epochs`` epochs each.
Per held-out frame: Spearman of the max force deviation vs the true max force error; per
atom: Spearman, Gaussian NLL and miscalibration area (``alflow.calibration``) with α fitted on
the validation split (scale, maximum likelihood) and, for the shallow committee, with its own
trained α = s as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from alflow import keys
from alflow.graph import atoms_to_batch
from potentials import registry
from potentials.base import compute_properties
from potentials.committee import Committee
from potentials.shallow import ShallowCommittee

K = 4
CUTOFF = 5.0


def _timed(fn: Callable[[], object], min_time: float = 0.3) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - start >= min_time:
            return (time.perf_counter() - start) / n


def rattled_cu(size: int):
    """A cubic fcc Cu supercell of about ``size`` atoms (a = 3.61 Å), rattled by 0.05 Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(round((size / 4) ** (1 / 3)))
    atoms.rattle(0.05, seed=0)
    return atoms


def cost(archs: list[str], sizes: list[int], repeats: int) -> None:
    print(f"| arch | atoms | one model (ms) | shallow mean | shallow heads | full committee (loop) |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in archs:
        for size in sizes:
            atoms = rattled_cu(size)
            batch = atoms_to_batch(atoms, CUTOFF)
            torch.manual_seed(0)
            one = registry.build(arch, ["Cu"], CUTOFF).eval()
            mean = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K, forces_mode="mean").eval()
            heads = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K, forces_mode="heads").eval()
            full = Committee([registry.build(arch, ["Cu"], CUTOFF) for _ in range(K)], vectorize=False).eval()
            variants = {"one": lambda: compute_properties(one, batch), "mean": lambda: mean(batch),
                        "heads": lambda: heads(batch), "full": lambda: full(batch)}
            best = {k: float("inf") for k in variants}
            for _ in range(repeats):
                for k, fn in variants.items():
                    best[k] = min(best[k], _timed(fn))
            t1 = best["one"]
            print(f"| {arch} | {len(atoms)} | {t1 * 1e3:.1f} | {best['mean'] / t1:.2f}× | {best['heads'] / t1:.2f}× "
                  f"| {best['full'] / t1:.2f}× |", flush=True)


def _run_ipi(specs: list, model: torch.nn.Module, out: str, upper: float, progress: bool, device: str) -> None:
    """The ``ipi`` engine: one i-PI server per walker, one ``alflow ipi-driver`` serving them all, the driver
    computing a ``heads`` shallow committee's spread on recorded steps only (``sparse_spread``; an instance with
    ``sparse_spread = False`` is run with ``--spread-stride 1``, every step)."""
    from pathlib import Path

    import potentials
    from alflow.explore.ipi import IPIRunSpec, run_ipi_walkers
    from alflow.explore.ipi_driver import StopRules

    path = Path(out) / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    potentials.save(model, path)
    ipi_specs = [IPIRunSpec(atoms=w.atoms, ensemble=w.ensemble, temperature=w.temperature, timestep=w.timestep,
                            steps=w.steps, stride=w.stride, friction=w.friction, seed=w.seed + 1, name=w.name)
                 for w in specs]
    every_step = not getattr(model, "sparse_spread", True)
    results = run_ipi_walkers(ipi_specs, path, out, rules=StopRules(upper=upper), device=device, wall_seconds=1800,
                              spread_stride=1 if every_step else None)
    bad = [r for r in results if r.status != "DONE"]
    if bad:
        raise RuntimeError(f"i-PI walker {bad[0].name}: {bad[0].status}: {bad[0].message}")


def md_cost(archs: list[str], sizes: list[int], walkers: int, steps: int, stride: int, repeats: int,
            device: str, engine: str = "batched") -> None:
    """Langevin MD (600 K, 2 fs, ``walkers`` rattled Cu cells of ``size`` atoms, a frame every ``stride`` steps) in
    the ``batched`` engine (``alflow.explore.batched.run_batched``), the ``ase`` engine's lockstep walkers
    (``alflow.explore.ase_md.run_walkers``) or i-PI (one server per walker, one driver; :func:`_run_ipi`):
    wall time per variant as multiples of one model's MD."""
    import tempfile

    from alflow.explore.ase_md import WalkerSpec, run_walkers
    from alflow.explore.batched import run_batched

    run = {"batched": run_batched, "ase": run_walkers, "ipi": _run_ipi}[engine]
    print(f"engine: {engine}")

    print(f"| arch | atoms × walkers | steps (stride) | one model (s) | shallow heads, spread on frames | "
          f"shallow heads, every step | shallow mean | full committee |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in archs:
        for size in sizes:
            atoms = rattled_cu(size)
            specs = [WalkerSpec(atoms=atoms, ensemble="nvt-langevin", temperature=600.0, timestep=2.0, steps=steps,
                                stride=stride, seed=k, name=f"w{k}") for k in range(walkers)]
            torch.manual_seed(0)
            one = registry.build(arch, ["Cu"], CUTOFF).eval()
            sparse = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K, forces_mode="heads").eval()
            dense = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K, forces_mode="heads").eval()
            dense.sparse_spread = False  # this instance pays for the heads' spread on every step
            mean = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K, forces_mode="mean").eval()
            full = Committee([registry.build(arch, ["Cu"], CUTOFF) for _ in range(K)]).eval()
            variants = {"one": one, "sparse": sparse, "dense": dense, "mean": mean, "full": full}
            best = {k: float("inf") for k in variants}
            with tempfile.TemporaryDirectory() as tmp:
                for r in range(repeats):
                    for name, model in variants.items():
                        t0 = time.perf_counter()
                        run(specs, model, f"{tmp}/{name}{r}", upper=1e6, progress=False, device=device)
                        best[name] = min(best[name], time.perf_counter() - t0)
            t1 = best["one"]
            print(f"| {arch} | {len(atoms)} × {walkers} | {steps} ({stride}) | {t1:.2f} | {best['sparse'] / t1:.2f}× | "
                  f"{best['dense'] / t1:.2f}× | {best['mean'] / t1:.2f}× | {best['full'] / t1:.2f}× |", flush=True)


def heads_overhead(archs: list[str], sizes: list[int]) -> None:
    """What the shallow ``mean`` mode adds to one model: K heads instead of one readout, forward + backward
    on (N, F) features (best of 20 calls), next to one model's energy + forces on N atoms."""
    print("| arch | atoms | one readout (ms) | 4 heads (ms) | one model (ms) | heads - readout, share of one model |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in archs:
        for size in sizes:
            atoms = rattled_cu(size)
            batch = atoms_to_batch(atoms, CUTOFF)
            torch.manual_seed(0)
            one = registry.build(arch, ["Cu"], CUTOFF).eval()
            sc = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF), K)
            width = next(m for m in sc.heads.heads[0].modules() if isinstance(m, torch.nn.Linear)).in_features
            x = torch.randn(len(atoms), width, requires_grad=True)

            def call(module: torch.nn.Module) -> Callable[[], object]:
                return lambda: torch.autograd.grad(module(x).sum(), x)

            best = {}
            for name, fn in (("readout", call(one.readout)), ("heads", call(sc.heads)),
                             ("model", lambda: compute_properties(one, batch))):
                fn()
                times = []
                for _ in range(20 if name != "model" else 3):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                best[name] = min(times)
            extra = (best["heads"] - best["readout"]) / best["model"]
            print(f"| {arch} | {len(atoms)} | {best['readout'] * 1e3:.3f} | {best['heads'] * 1e3:.3f} | "
                  f"{best['model'] * 1e3:.1f} | {100 * extra:.2f} % |", flush=True)


# ----------------------------------------------------------------------------- calibration


def cu_frames(n: int, rattle: tuple[float, float], seed: int) -> list:
    """``n`` rattled and strained 32-atom fcc Cu cells labelled by EMT (REF_energy, REF_forces)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(0, rng.uniform(*rattle), atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


def predictions(model: torch.nn.Module, frames: list) -> dict[str, np.ndarray]:
    """Per atom: raw (α = 1) deviation ε_i and error |ΔF_i|; per frame: max of each."""
    batch = atoms_to_batch(frames, model.cutoff, labels=True)
    out = model(batch, forces=True, calibrated=False)
    eps = out["force_deviation"].detach().numpy()
    err = np.linalg.norm((out[keys.FORCES] - batch[keys.REF_FORCES]).detach().numpy(), axis=1)
    which = batch[keys.BATCH].numpy()
    n = len(frames)
    return {"eps": eps, "err": err, "max_eps": np.array([eps[which == b].max() for b in range(n)]),
            "max_err": np.array([err[which == b].max() for b in range(n)])}


def scores(test: dict[str, np.ndarray], alpha: float) -> dict[str, float]:
    from alflow.calibration import gaussian_nll, miscalibration_area, spearman

    return {"spearman_frame": spearman(test["max_eps"], test["max_err"]),
            "spearman_atom": spearman(test["eps"], test["err"]),
            "nll": gaussian_nll(alpha * test["eps"], test["err"]),
            "area": miscalibration_area(alpha * test["eps"], test["err"]),
            "force_rmse": float(np.sqrt(np.mean(test["err"] ** 2) / 3))}


def fit_alpha(valid: dict[str, np.ndarray]) -> float:
    """Maximum-likelihood global scale: α² = mean |ΔF|² / ε² (alflow.calibration's ``scale``)."""
    ok = valid["eps"] > 0
    return float(np.sqrt(np.mean(valid["err"][ok] ** 2 / valid["eps"][ok] ** 2)))


def calibration(arch: str, epochs: int, nll_epochs: int, seed: int, n_train: int, n_test: int,
                hparams: dict, test_rattle: tuple[float, float] = (0.02, 0.15)) -> dict[str, dict[str, float]]:
    from alflow.config import TrainingConfig
    from alflow.train import train_committee
    from alflow.train_shallow import train_shallow

    frames = cu_frames(n_train, (0.02, 0.10), seed)
    test = cu_frames(n_test, test_rattle, seed + 1000)
    cfg = TrainingConfig(epochs=epochs, nll_epochs=nll_epochs, lr=5e-3, batch_size=4, patience=1000,
                         valid_fraction=0.2, energy_weight=1.0, forces_weight=10.0)
    rows = {}
    torch.manual_seed(seed)
    sh = ShallowCommittee(registry.build(arch, ["Cu"], CUTOFF, **hparams), K, seed=seed)
    start = time.perf_counter()
    res = train_shallow(sh, frames, cfg, device="cpu", seed=seed, progress=False)
    t_sh = time.perf_counter() - start
    valid = [frames[i] for i in res.valid_idx]
    for mode in ("heads", "mean"):
        sh.forces_mode = mode
        a = fit_alpha(predictions(sh, valid))
        rows[f"shallow/{mode}"] = {**scores(predictions(sh, test), a), "alpha": a, "train_s": t_sh}
    sh.forces_mode = "heads"
    rows["shallow/heads own α"] = {**scores(predictions(sh, test), float(sh.alpha)), "alpha": float(sh.alpha)}
    full = Committee.build(arch, K, ["Cu"], CUTOFF, seed=seed, **hparams)
    cfg_full = cfg.model_copy(update={"epochs": epochs + nll_epochs})
    start = time.perf_counter()
    res = train_committee(full, frames, cfg_full, device="cpu", seed=seed, progress=False)
    t_full = time.perf_counter() - start
    full.eval()
    a = fit_alpha(predictions(full, [frames[i] for i in res.valid_idx]))
    rows["full"] = {**scores(predictions(full, test), a), "alpha": a, "train_s": t_full}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--archs", nargs="+", default=["schnet", "painn"])
    c.add_argument("--sizes", nargs="+", type=int, default=[108, 2048])
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=1)
    h = sub.add_parser("heads")
    h.add_argument("--archs", nargs="+", default=["schnet", "painn"])
    h.add_argument("--sizes", nargs="+", type=int, default=[108, 2048])
    h.add_argument("--threads", type=int, default=1)
    m = sub.add_parser("md")
    m.add_argument("--archs", nargs="+", default=["schnet", "painn"])
    m.add_argument("--sizes", nargs="+", type=int, default=[32, 108])
    m.add_argument("--walkers", type=int, default=8)
    m.add_argument("--steps", type=int, default=100)
    m.add_argument("--stride", type=int, default=20)
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--device", default="cpu")
    m.add_argument("--engine", default="batched", choices=("batched", "ase", "ipi"))
    m.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("calibration")
    k.add_argument("--arch", default="schnet")
    k.add_argument("--epochs", type=int, default=30)
    k.add_argument("--nll-epochs", type=int, default=20)
    k.add_argument("--seeds", nargs="+", type=int, default=[0])
    k.add_argument("--n-train", type=int, default=60)
    k.add_argument("--n-test", type=int, default=30)
    k.add_argument("--test-rattle", nargs=2, type=float, default=[0.02, 0.15])
    k.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.what == "cost":
        cost(args.archs, args.sizes, args.repeats)
        return
    if args.what == "md":
        md_cost(args.archs, args.sizes, args.walkers, args.steps, args.stride, args.repeats, args.device, args.engine)
        return
    if args.what == "heads":
        heads_overhead(args.archs, args.sizes)
        return
    hp = {"schnet": dict(n_atom_basis=32, n_filters=32, n_interactions=2),
          "painn": dict(n_atom_basis=32, n_interactions=2)}.get(args.arch, {})
    print("| seed | committee | α | Spearman frame max | Spearman atom | NLL (nats/atom) | miscal. area | F RMSE (eV/Å) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        rows = calibration(args.arch, args.epochs, args.nll_epochs, seed, args.n_train, args.n_test, hp,
                           tuple(args.test_rattle))
        for name, r in rows.items():
            print(f"| {seed} | {name} | {r['alpha']:.3g} | {r['spearman_frame']:.2f} | {r['spearman_atom']:.2f} | "
                  f"{r['nll']:.2f} | {r['area']:.3f} | {r['force_rmse']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
