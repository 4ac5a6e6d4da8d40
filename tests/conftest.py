"""Test-session rules: what runs where, and saying so.

- ``gpu`` tests run when CUDA is present, else they are skipped with that reason.
- ``dft`` tests name their code (``@pytest.mark.dft("gpaw")``) and run where it is
  installed, else they are skipped naming the missing code.
- ``slow`` tests run by default (the CI command runs everything this machine can);
  ``pytest -m "not slow"`` is the quick developer loop.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

DFT_CODES = ("gpaw", "espresso", "cp2k", "xtb")  # reported in the header; how to find each: alflow.oracles.ORACLES


def dft_available(code: str) -> bool:
    """Whether ``code`` runs here: its module or executable from the oracle table (cp2k also as cp2k.psmp)."""
    from alflow.oracles import ORACLES

    spec = ORACLES.get(code)
    if spec is not None and spec.executable:
        name = spec.executable
        return shutil.which(name) is not None or shutil.which(name.replace("_shell", ".psmp")) is not None
    module = spec.module if spec is not None and spec.module else code
    return importlib.util.find_spec(module) is not None


# Tests use small models: one intra-op thread is faster and keeps CI's 2 cores for subprocesses
# (i-PI servers, labelling workers) that tests start.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device on this machine"))
        marker = item.get_closest_marker("dft")
        if marker is not None:
            codes = marker.args or ("gpaw",)
            missing = [c for c in codes if not dft_available(c)]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"dft: {', '.join(missing)} not installed here"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    dft = ", ".join(f"{c}={'yes' if dft_available(c) else 'no'}" for c in DFT_CODES)
    return [f"alflow: torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}; DFT codes: {dft}"]
