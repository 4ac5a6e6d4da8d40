"""Committee evaluation cost: one batched (vmapped) committee of K vs K sequential calls vs one model.

Also times the committee's sequential path (``vectorize=False``, the CPU default), i.e.
the K member calls plus the scores.

    python benchmarks/committee.py [--repeats 7] [--sizes 108 500 2048] [--archs schnet painn] [--threads 2]

K = 4 members with default hyperparameters (SchNet: 64 features, 64 filters, 3
interactions, 20 Gaussians; PaiNN: 64 features, 3 interactions, 20 radial functions),
cutoff 5 Å, float32, on rattled fcc Cu (a = 3.61 Å) supercells of 108, 500 and 2,048
atoms; energy + forces (one backward pass). The neighbor list and the batch are built
once, outside the timings, so the table measures the networks only. Each variant is
timed in the same process, interleaved round by round; the table reports the best of
``--repeats`` rounds (each round ≥ 0.3 s of calls) and, as a noise figure, the median
over the best. Threads: ``torch.set_num_threads`` (default: every core torch sees).

The last columns bound what any batching can reach. What K members of one architecture
can share is the geometry: the edge vectors, the distances and, for architectures whose
radial basis and cutoff are fixed buffers (SchNet, PaiNN), the basis and cutoff values,
with their backward pass to the positions. Everything else runs on each member's own
weights. Timing that shared part alone (``shared``, s = shared / one model) gives the
Amdahl bound of a committee that computes it once and the rest K times with the same
efficiency as one model: s + K (1 - s) times one model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from ase.build import bulk

from alflow import keys
from alflow.graph import atoms_to_batch
from alflow.neighbors import edge_vectors
from potentials.base import compute_properties
from potentials.committee import Committee

K = 4
CUTOFF = 5.0


def timed(fn: Callable[[], object], min_time: float = 0.3) -> float:
    """Mean wall time (s) of ``fn`` over one round of ≥ ``min_time`` seconds, after one untimed call.

    The untimed call is there because at 2,048 atoms and 2 threads one SchNet call measured
    1.5x slower than each of four calls in a row (suspected cause, not verified: first-touch
    costs of memory freed by the previous variant). It narrowed that gap (to 1.3x in the next
    run) without closing it; docs/benchmarks.md records the 1-thread table for that reason.
    """
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def cu_batch(n_atoms: int) -> dict[str, torch.Tensor]:
    reps = round((n_atoms / 4) ** (1 / 3))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    assert len(atoms) == n_atoms, (len(atoms), n_atoms)
    atoms.rattle(0.05, seed=0)
    return atoms_to_batch(atoms, CUTOFF, dtype=torch.float32)


def shared_geometry(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    """The part of energy+forces that K members could share: geometry (+ fixed radial basis), forward and backward."""
    idx_i, idx_j = batch[keys.EDGE_INDEX]
    basis = [m for m in (getattr(model, "radial_basis", None), getattr(model, "cutoff_fn", None)) if m is not None]

    def fn() -> object:
        positions = batch[keys.POSITIONS].detach().requires_grad_(True)
        vectors = edge_vectors(positions, batch[keys.CELL], idx_i, idx_j, batch[keys.SHIFTS], batch[keys.BATCH])
        d = torch.linalg.vector_norm(vectors, dim=-1)
        outputs = [d] + [b(d) for b in basis]
        return torch.autograd.grad([o.sum() for o in outputs], positions)

    return fn


def run(arch: str, sizes: list[int], repeats: int) -> list[str]:
    committee = Committee.build(arch, K, ["Cu"], CUTOFF, seed=0).float().eval()
    committee.vectorize = True  # the batched vmap pass (the CPU default, "auto", is the loop)
    looped = Committee(list(committee.members), vectorize=False).eval()  # same members, sequential path
    one = committee.members[0]
    vmap_default = Committee(list(committee.members)).vectorized  # what vectorize="auto" picks on this device

    def mark(ratio: float, default: bool) -> str:
        return f"**{ratio:.2f}×**" if default else f"{ratio:.2f}×"

    rows = []
    for n in sizes:
        batch = cu_batch(n)
        variants = {
            "one model": lambda: compute_properties(one, batch, forces=True),
            f"{K} sequential": lambda: [compute_properties(m, batch, forces=True) for m in committee.members],
            "committee (vmap)": lambda: committee(batch, forces=True),
            "committee (loop)": lambda: looped(batch, forces=True),
            "shared": shared_geometry(one, batch),
        }
        # exactness check of the batched path in this very run (float32)
        out = committee(batch, forces=True)
        ref = compute_properties(committee.members[-1], batch, forces=True)
        err = float((out[keys.FORCES_COMM][-1] - ref[keys.FORCES]).abs().max())
        for fn in variants.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                samples[name].append(timed(fn))
        best = {name: min(s) for name, s in samples.items()}
        noise = {name: statistics.median(s) / min(s) for name, s in samples.items()}
        t1, tk, tc, tl, ts = (best[name] for name in variants)
        share = ts / t1
        bound = share + K * (1 - share)
        rows.append(
            f"| {arch} | {n} | {batch[keys.EDGE_INDEX].shape[1]} | {t1 * 1e3:.1f} | {tk * 1e3:.1f} | {tc * 1e3:.1f} "
            f"| {tl * 1e3:.1f} | {tk / t1:.2f}× | {mark(tc / t1, vmap_default)} | {mark(tl / t1, not vmap_default)} | {err:.1e} "
            f"| {' / '.join(f'{noise[name]:.2f}' for name in variants)} | {ts * 1e3:.2f} ({share:.1%}) | {bound:.2f}× |"
        )
        print(rows[-1], flush=True)
    if not committee.vectorized:
        rows.append(f"| {arch} | (vmap fell back to the sequential loop: {committee._vmap_error}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[108, 500, 2048])
    parser.add_argument("--archs", nargs="+", default=["schnet", "painn"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores torch sees)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(
        f"# committee of K={K}, float32, energy+forces, cutoff {CUTOFF} Å; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}; neighbor list built once outside the timings; "
        f"best of {args.repeats} rounds\n"
    )
    header = (
        "| model | atoms | edges | one model (ms) | 4 sequential calls (ms) | committee vmap (ms) "
        "| committee loop (ms) | sequential / one | vmap / one | loop / one | max abs ΔF vmap vs member (eV/Å) "
        "| noise: median/best (one / seq / vmap / loop / shared) | shared part (ms, share of one) "
        f"| Amdahl bound, K={K} |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header, flush=True)
    for arch in args.archs:
        run(arch, args.sizes, args.repeats)


if __name__ == "__main__":
    main()
