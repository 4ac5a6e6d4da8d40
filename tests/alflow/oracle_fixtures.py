"""Misbehaving ASE calculators for the labelling tests (used as import-path oracles "oracle_fixtures:Name").

The label workers import this module through the ``worker_pythonpath`` parameter
(this directory). EMT is imported only inside ``calculate`` (it pulls in scipy,
~1 s per worker start), and ``SleepyHarmonic`` needs numpy only, so the resume
test with many short calculations stays fast.
"""

from __future__ import annotations

import os
import signal
import time

from ase.calculators.calculator import Calculator, all_changes


class _EMT(Calculator):
    """ASE EMT behind a lazy import; subclasses add the misbehaviour in ``before``/``after``."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def before(self, atoms) -> None:
        """Hook run before the EMT calculation."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.before(self.atoms)
        from ase.calculators.emt import EMT

        emt = EMT()
        emt.calculate(self.atoms, list(properties), all_changes)  # a fresh EMT: always from scratch (MD too)
        self.results = dict(emt.results)


class CrashOnAl(_EMT):
    """EMT, but a frame containing Al kills the process: SIGSEGV (``how="segv"``) or ``os._exit(3)``."""

    def __init__(self, how: str = "segv", **kwargs):
        super().__init__(**kwargs)
        self.how = how

    def before(self, atoms) -> None:
        if 13 in atoms.numbers:
            if self.how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(3)


class SleepyEMT(_EMT):
    """EMT after sleeping ``delay`` seconds (a slow oracle)."""

    def __init__(self, delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def before(self, atoms) -> None:
        time.sleep(self.delay)


class SCFError(RuntimeError):
    """Stands in for a DFT code's convergence error."""


class FlakyEMT(_EMT):
    """EMT that fails like an unconverged SCF unless ``mixing_beta`` <= 0.2 (fallback parameters fix it)."""

    def __init__(self, mixing_beta: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        self.mixing_beta = mixing_beta

    def before(self, atoms) -> None:
        if self.mixing_beta > 0.2:
            raise SCFError(f"SCF not converged after 100 iterations (mixing_beta={self.mixing_beta})")


class NoStressEMT(_EMT):
    """Claims stress in implemented_properties but never computes it."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, [p for p in properties if p != "stress"], system_changes)
        self.results.pop("stress", None)


class BadShapeOnAl(_EMT):
    """EMT, but for a frame containing Al the result is malformed: ``what`` = "forces" gives forces of
    shape (N, 2), "energy" an energy of shape (2,), "stress" a stress of shape (4,)."""

    def __init__(self, what: str = "forces", **kwargs):
        super().__init__(**kwargs)
        self.what = what

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if 13 not in self.atoms.numbers:
            return
        import numpy as np

        if self.what == "forces":
            self.results["forces"] = self.results["forces"][:, :2]
        elif self.what == "energy":
            self.results["energy"] = self.results["free_energy"] = np.array([1.0, 2.0])
        elif self.what == "stress" and "stress" in self.results:
            self.results["stress"] = self.results["stress"][:4]


class SleepyHarmonic(Calculator):
    """E = k/2 Σ_i |r_i - r̄|² (eV, k in eV/Å²) after sleeping ``delay`` s; numpy only, starts fast.

    No other keyword arguments: a misspelt parameter fails when the calculator is built."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, delay: float = 0.0, k: float = 1.0):
        super().__init__()
        self.delay, self.k = delay, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        time.sleep(self.delay)
        d = self.atoms.positions - self.atoms.positions.mean(axis=0)
        self.results = {"energy": 0.5 * self.k * float((d**2).sum()), "forces": -self.k * d}


def harmonic_energy(atoms, k: float = 1.0) -> float:
    """The energy SleepyHarmonic gives (for checks in the test process)."""
    d = atoms.positions - atoms.positions.mean(axis=0)
    return 0.5 * k * float((d**2).sum())


__all__ = ["BadShapeOnAl", "CrashOnAl", "FlakyEMT", "NoStressEMT", "SleepyEMT", "SleepyHarmonic", "harmonic_energy"]
