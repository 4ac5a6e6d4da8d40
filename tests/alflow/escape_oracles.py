"""Oracles that try to outlive or outgrow their label worker (import path "escape_oracles:Name").

The label workers import this module through the ``worker_pythonpath`` parameter
(this directory); numpy and ASE only, so a worker starts fast.
"""

from __future__ import annotations

import os
import time

from ase.calculators.calculator import Calculator, all_changes


class DaemonThenHang(Calculator):
    """Starts a daemon (double fork, own session, pid written to ``marker``) and then hangs."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, marker: str = "", **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                with open(self.marker + ".tmp", "w") as fh:
                    fh.write(str(os.getpid()))
                os.rename(self.marker + ".tmp", self.marker)
                time.sleep(600)
            os._exit(0)
        time.sleep(600)


class MemoryHog(Calculator):
    """Allocates ``gigabytes`` GB (1e9 bytes) and then returns zero energy and forces."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, gigabytes: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.gigabytes = gigabytes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        import numpy as np

        block = np.ones(int(self.gigabytes * 1e9), dtype=np.uint8)
        self.results = {"energy": float(block[0]) * 0.0, "forces": np.zeros((len(self.atoms), 3))}
