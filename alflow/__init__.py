"""alflow: active learning of machine-learned interatomic potentials for periodic materials.

Units are ASE's everywhere outside an i-PI socket: eV, Å, eV/Å, eV/Å³, fs.
This package never imports prefect; the workflow layer lives in ``flows``.
"""

__version__ = "0.1.0"
