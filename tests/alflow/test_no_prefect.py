"""``alflow/`` never imports Prefect: the package runs (``alflow run --no-prefect``, every other
command, Dask and process workers) where Prefect is absent; only ``flows/`` may import it.

A fresh interpreter imports every module under ``alflow`` and then looks at ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, json, pkgutil, sys
import alflow
names, failed = [], {}
for info in pkgutil.walk_packages(alflow.__path__, "alflow."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
        names.append(info.name)
    except ImportError as err:  # an optional dependency missing here: reported, not hidden
        failed[info.name] = repr(err)
prefect = sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect."))
print(json.dumps({"imported": names, "failed": failed, "prefect": prefect}))
"""


def test_importing_every_alflow_module_never_imports_prefect() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prefect"] == [], f"alflow imported prefect: {result['prefect'][:5]}"
    imported = set(result["imported"])
    for core in ("alflow.cli", "alflow.config", "alflow.loop", "alflow.stages", "alflow.report", "alflow.label",
                 "alflow.preflight", "alflow.devices", "alflow.commands.run", "alflow.explore.runner"):
        assert core in imported, (core, result["failed"].get(core))
    assert len(imported) >= 30, result
