"""Neural network potentials for alflow: a registry, builders and one-file checkpoints.

    import potentials
    potentials.available()                      # ['mace', 'painn', 'schnet', ...]
    model = potentials.build("schnet", species=["Cu"], cutoff=5.0, n_interactions=3)
    potentials.save(model, "model.pt")
    model = potentials.load("model.pt", device="cpu")

Architectures are imported only when built, so ``import potentials`` stays light.
"""

from __future__ import annotations

from potentials.base import Potential, UnknownElementError
from potentials.registry import available, build, get_class, load, save

__all__ = ["Potential", "UnknownElementError", "available", "build", "get_class", "load", "save"]
