"""The one Voigt <-> 3x3 stress conversion (eV/Å³, ASE sign and order xx yy zz yz xz xy).

``to_voigt`` takes a Voigt (6,) or a full (3, 3) stress, or a stack of either (..., 6) / (..., 3, 3),
and returns float64 Voigt components (off-diagonal: the mean of the two, as ASE's
``full_3x3_to_voigt_6_stress``); ``to_matrix`` is its inverse for a symmetric stress.
Any other shape is a ``ValueError`` naming ``what`` and the shape. Used by the dataset
(``alflow.io``), the training graphs (``alflow.graph``), the ASE calculator and the label worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VOIGT_INDEX = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # component k of the Voigt vector: (row, column)


def to_voigt(stress: Any, what: str = "stress") -> np.ndarray:
    """(…, 6) Voigt or (…, 3, 3) full → float64 (…, 6) Voigt, xx yy zz yz xz xy."""
    s = np.asarray(stress, dtype=float)
    if s.shape[-2:] == (3, 3):
        return np.stack([(s[..., i, j] + s[..., j, i]) / 2 for i, j in VOIGT_INDEX], axis=-1)
    if s.ndim >= 1 and s.shape[-1] == 6:
        return s.copy()
    raise ValueError(f"{what}: expected 6 Voigt components or a 3x3 matrix (eV/Å³), got shape {s.shape}")


def to_matrix(stress: Any, what: str = "stress") -> np.ndarray:
    """(…, 6) Voigt or (…, 3, 3) full → float64 (…, 3, 3) symmetric matrix."""
    s = np.asarray(stress, dtype=float)
    if s.shape[-2:] == (3, 3):
        return s.copy()
    if s.ndim >= 1 and s.shape[-1] == 6:
        xx, yy, zz, yz, xz, xy = np.moveaxis(s, -1, 0)
        return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)
    raise ValueError(f"{what}: expected 6 Voigt components or a 3x3 matrix (eV/Å³), got shape {s.shape}")
