"""Can ``torch.compile`` speed up force training? One SchNet training step, eager vs compiled.

    OMP_NUM_THREADS=1 python benchmarks/compile_forces.py [--device cpu|cuda] [--repeats 10]

A force loss needs the gradient of the energy with ``create_graph=True`` and then a backward pass
through that gradient (double backward). The step here is exactly that: energy of 256 Cu atoms and
3000 random edges (vectors as the leaf), forces by ``torch.autograd.grad(create_graph=True)``, a loss on
energy and forces, ``loss.backward()``. Prints ms per step for each variant, or why it failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    from potentials.registry import build

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build("schnet", [29], 4.5, n_atom_basis=32, n_filters=32, n_interactions=2).to(dev)
    species = torch.zeros(256, dtype=torch.long, device=dev)
    edges = torch.randint(0, 256, (2, 3000), device=dev)
    vectors = torch.randn(3000, 3, device=dev) * 1.5
    batch = {"edge_index": edges}

    def step(fn) -> None:
        vec = vectors.clone().requires_grad_(True)
        energy = fn(batch, vec, species).sum()
        (grad,) = torch.autograd.grad(energy, vec, create_graph=True)
        (1e-6 * energy.square() + grad.square().mean()).backward()

    print(f"torch {torch.__version__}, device {dev}")
    for name, fn in (("eager", model.atomic_energies), ("torch.compile", torch.compile(model.atomic_energies))):
        try:
            step(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: {(time.perf_counter() - t0) / args.repeats * 1e3:.1f} ms per training step")
        except Exception as err:  # noqa: BLE001 - the point is to report why it cannot be used
            print(f"{name}: FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
