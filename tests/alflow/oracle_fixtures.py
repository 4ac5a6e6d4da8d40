"""Misbehaving ASE calculators for the labelling tests (used as import-path oracles "oracle_fixtures:Name").

The label workers import this module through the ``worker_pythonpath`` parameter
(this directory), so nothing here runs in the test process itself.
"""

from __future__ import annotations

import os
import signal
import time

from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT


class CrashOnAl(EMT):
    """EMT, but a frame containing Al kills the process: SIGSEGV (``how="segv"``) or ``os._exit(3)``."""

    def __init__(self, how: str = "segv", **kwargs):
        super().__init__(**kwargs)
        self.how = how

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if 13 in atoms.numbers:
            if self.how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(3)
        super().calculate(atoms, properties, system_changes)


class SleepyEMT(EMT):
    """EMT after sleeping ``delay`` seconds (a slow oracle)."""

    def __init__(self, delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        time.sleep(self.delay)
        super().calculate(atoms, properties, system_changes)


class SCFError(RuntimeError):
    """Stands in for a DFT code's convergence error."""


class FlakyEMT(EMT):
    """EMT that fails like an unconverged SCF unless ``mixing_beta`` <= 0.2 (fallback parameters fix it)."""

    def __init__(self, mixing_beta: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        self.mixing_beta = mixing_beta

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if self.mixing_beta > 0.2:
            raise SCFError(f"SCF not converged after 100 iterations (mixing_beta={self.mixing_beta})")
        super().calculate(atoms, properties, system_changes)


class NoStressEMT(EMT):
    """Claims stress in implemented_properties but never computes it."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, [p for p in properties if p != "stress"], system_changes)
        self.results.pop("stress", None)
