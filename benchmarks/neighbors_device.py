"""Neighbor lists on tensors, one run: alflow's torch and vesin paths against vesin-torch, torch-sim and nvalchemi.

    python benchmarks/neighbors_device.py [--device cpu|cuda] [--dtype float32] [--threads 1]
                                          [--repeats 3] [--quick] [--json out.json]
                                          [--torch-sim-src DIR]

Cases (cutoff 5 Å, full lists, periodic): one 108-atom Cu cell, one 2,048-atom Cu cell, a batch of
64 x 108-atom Cu cells (each rattled differently), one 21,952-atom diamond Si cell. Every library gets
torch tensors already on ``--device`` and returns pair indices and integer shifts there (time includes
any host round trip the library makes). Libraries that are not installed are skipped with a note:

- alflow torch   ``batch_neighbor_list(..., backend="torch")``: the pure-torch cell list (the CUDA default)
- alflow vesin   ``batch_neighbor_list(..., backend="vesin")``: host copy + vesin's C++ cell list per structure
- vesin-torch    ``vesin.torch.NeighborList(cutoff, full_list=True).compute`` per structure (``pip install vesin-torch``)
- torch-sim      ``torch_nl_linked_cell`` and ``torch_nl_n2`` (pure torch). torch-sim-atomistic >= 0.4 needs
                 Python >= 3.12; on 3.11 point ``--torch-sim-src`` at a checkout's top folder (the folder
                 holding ``torch_sim/``): only ``transforms.py`` and ``neighbors/`` are loaded from it
- nvalchemi      ``nvalchemiops.torch.neighbors.neighbor_list(..., return_neighbor_list=True)`` (Warp kernels;
                 ``pip install nvalchemi-toolkit-ops warp-lang``), automatic method choice

Each cell: best wall time (ms) over ``--repeats`` interleaved rounds (every library in turn, each round
>= 0.2 s of calls after one untimed call); torch-sim's O(N^2) search only up to 1,000 atoms.
The pair count of every library is printed beside it (a mismatch with alflow's count is flagged "!").
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import importlib
import json
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

from alflow.neighbors import batch_neighbor_list

CUTOFF = 5.0
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # pos, cells, pbc, batch, counts


def cases(quick: bool) -> dict[str, list[Atoms]]:
    rng = np.random.default_rng(0)

    def cu(reps: int, seed: int) -> Atoms:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
        atoms.rattle(0.05, seed=seed)
        return atoms

    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat(6 if quick else 14)
    si.rattle(0.05, seed=1)
    return {
        "Cu 108": [cu(3, 0)],
        "Cu 2,048": [cu(8, 0)],
        f"{8 if quick else 64} x Cu 108": [cu(3, int(rng.integers(1 << 30))) for _ in range(8 if quick else 64)],
        f"Si {len(si):,}": [si],
    }


def as_inputs(frames: list[Atoms], device: str, dtype: torch.dtype) -> Inputs:
    counts = torch.tensor([len(a) for a in frames], device=device)
    return (
        torch.tensor(np.concatenate([a.positions for a in frames]), dtype=dtype, device=device),
        torch.tensor(np.stack([a.cell.array for a in frames]), dtype=dtype, device=device),
        torch.tensor(np.stack([a.pbc for a in frames]), device=device),
        torch.repeat_interleave(torch.arange(len(frames), device=device), counts),
        counts,
    )


# ----------------------------------------------------------------------------- the libraries


def alflow_lib(backend: str) -> Callable[[Inputs], int]:
    def run(x: Inputs) -> int:
        pos, cells, pbc, _, counts = x
        return len(batch_neighbor_list(pos, cells, pbc, counts, CUTOFF, backend=backend))

    return run


def vesin_torch_lib() -> Callable[[Inputs], int]:
    try:
        from vesin_torch import NeighborList
    except ImportError:  # older vesin-torch
        from vesin.torch import NeighborList

    calc = NeighborList(cutoff=CUTOFF, full_list=True)

    def run(x: Inputs) -> int:
        pos, cells, pbc, _, counts = x
        total, start = 0, 0
        for b, n in enumerate(counts.tolist()):  # one structure per call
            i, j, S = calc.compute(pos[start : start + n], cells[b], pbc[b], quantities="ijS", copy=True)
            total += len(i)
            start += n
        return total

    return run


def load_torch_sim(src: str | None) -> types.ModuleType:
    """torch_sim.neighbors: the installed package, else transforms.py + neighbors/ from a source checkout."""
    try:
        return importlib.import_module("torch_sim.neighbors")
    except (ImportError, SyntaxError):
        if not src:
            raise
        for name in [m for m in sys.modules if m == "torch_sim" or m.startswith("torch_sim.")]:
            del sys.modules[name]
        package = types.ModuleType("torch_sim")  # a bare package: skips torch_sim/__init__ (Python >= 3.12 syntax)
        package.__path__ = [str(Path(src) / "torch_sim")]
        sys.modules["torch_sim"] = package
        return importlib.import_module("torch_sim.neighbors")


def torch_sim_lib(src: str | None, name: str) -> Callable[[Inputs], int]:
    fn = getattr(load_torch_sim(src), name)

    def run(x: Inputs) -> int:
        pos, cells, pbc, batch, _ = x
        mapping, _, _ = fn(pos, cells, pbc, CUTOFF, batch, False)
        return int(mapping.shape[1])

    return run


def nvalchemi_lib() -> Callable[[Inputs], int]:
    from nvalchemiops.torch.neighbors import neighbor_list

    def run(x: Inputs) -> int:
        pos, cells, pbc, batch, counts = x
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
        out = neighbor_list(pos, CUTOFF, cell=cells, pbc=pbc, batch_idx=batch.to(torch.int32), batch_ptr=ptr,
                            return_neighbor_list=True)
        return int(out[0].shape[1])

    return run


# ----------------------------------------------------------------------------- timing


def best_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None], min_time: float = 0.2) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            sync()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test): 8 x 108, a 1,728-atom Si cell")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--torch-sim-src", default=os.environ.get("TORCH_SIM_SRC"),
                        help="folder holding a torch-sim checkout's torch_sim/ (when the package does not import)")
    parser.add_argument("--max-call-s", type=float, default=20.0, help="skip a library's remaining cases after a call this slow")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)

    libs: dict[str, Callable[[Inputs], int]] = {"alflow torch": alflow_lib("torch"), "alflow vesin": alflow_lib("vesin")}
    factories: dict[str, Callable[[], Callable[[Inputs], int]]] = {
        "vesin-torch": vesin_torch_lib,
        "torch-sim linked-cell": lambda: torch_sim_lib(args.torch_sim_src, "torch_nl_linked_cell"),
        "torch-sim n2": lambda: torch_sim_lib(args.torch_sim_src, "torch_nl_n2"),
        "nvalchemi": nvalchemi_lib,
    }
    for name, make in factories.items():
        try:
            libs[name] = make()
        except Exception as exc:  # noqa: BLE001 - a missing optional library is a note, not a failure
            print(f"# {name}: skipped ({type(exc).__name__}: {exc})", flush=True)

    print(f"# neighbor lists on {device}, {args.dtype}, {args.threads} CPU thread(s), cutoff {CUTOFF} Å — "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    names = list(libs)
    print("| case | atoms | pairs | " + " | ".join(f"{n} (ms)" for n in names) + " | fastest | alflow torch / fastest |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---|---:|")
    rows, slow = [], set()
    for case, frames in cases(args.quick).items():
        x = as_inputs(frames, device, dtype)
        times: dict[str, float] = {}
        pairs: dict[str, int] = {}
        timed = []
        for name in names:
            if name in slow or (name == "torch-sim n2" and x[0].shape[0] > 1000):  # O(N^2) memory and time
                continue
            try:
                start = time.perf_counter()
                pairs[name] = libs[name](x)
                sync()
                first = time.perf_counter() - start
                if first > args.max_call_s:  # the first call (warm-up included) is the figure; no more of them
                    slow.add(name)
                    print(f"# {name}: one call took {first:.0f} s (> {args.max_call_s} s): that call is its figure "
                          "for this case; its remaining cases are skipped", flush=True)
                    times[name] = first * 1e3
                    continue
                timed.append(name)
            except Exception as exc:  # noqa: BLE001
                print(f"# {name} on {case}: failed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        for _ in range(args.repeats):  # interleaved rounds: background load hits every library alike
            for name in timed:
                ms = best_ms(lambda: libs[name](x), 1, sync)
                times[name] = min(times.get(name, float("inf")), ms)
        ref = pairs.get("alflow torch")
        fastest = min(times, key=times.get)
        cells = []
        for name in names:
            if name not in times:
                cells.append("–")
                continue
            flag = "" if pairs[name] == ref else f" ! {pairs[name]} pairs"
            cells.append(f"{times[name]:.2f}{flag}")
            rows.append({"case": case, "atoms": int(x[0].shape[0]), "library": name, "device": device, "dtype": args.dtype,
                         "threads": args.threads, "ms": times[name], "pairs": pairs[name],
                         "over_fastest": times[name] / times[fastest]})
        ratio = times["alflow torch"] / times[fastest] if "alflow torch" in times else float("nan")
        print(f"| {case} | {x[0].shape[0]:,} | {ref:,} | " + " | ".join(cells) + f" | {fastest} | {ratio:.2f} |", flush=True)
    walkers = next(frames for case, frames in cases(args.quick).items() if case.endswith(" x Cu 108"))
    rows += skin_table(walkers, device, dtype, args.repeats, sync)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def skin_table(frames: list[Atoms], device: str, dtype: torch.dtype, repeats: int, sync: Callable[[], None]) -> list[dict]:
    """alflow.neighbors.SkinNeighborList on the walker batch: a call that only checks vs one that rebuilds."""
    from alflow.neighbors import SkinNeighborList

    pos, cells, pbc, batch, _ = as_inputs(frames, device, dtype)
    nl = SkinNeighborList(CUTOFF, skin=0.5)
    moved = pos + 0.01  # within the skin: a check, no rebuild
    nl(pos, cells, pbc, batch)
    check = best_ms(lambda: nl(moved, cells, pbc, batch), repeats, sync)
    assert nl.rebuilds == 1

    def rebuild() -> None:
        nl.reset()
        nl(pos, cells, pbc, batch)

    build = best_ms(rebuild, repeats, sync)
    print(f"\nSkinNeighborList (cutoff {CUTOFF} + skin 0.5 Å), {len(frames)} x {len(frames[0])} atoms on {device}: "
          f"call that only checks {check:.3f} ms, call that rebuilds {build:.2f} ms", flush=True)
    return [{"case": f"skin check, {len(frames)} x {len(frames[0])}", "library": "alflow SkinNeighborList", "device": device,
             "ms": check}, {"case": f"skin rebuild, {len(frames)} x {len(frames[0])}", "library": "alflow SkinNeighborList",
                            "device": device, "ms": build}]


if __name__ == "__main__":
    main()
