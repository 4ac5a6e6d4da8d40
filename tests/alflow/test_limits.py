"""Every input has a size limit: hostile YAML, NaN/inf and absurd numbers, absurd neighbor-list cutoffs.

Each would hang or exhaust memory on the old code (a "billion laughs" YAML in
validation, a 10^6 Å cutoff in the neighbor list); the tests run the hostile
input in a subprocess with a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from alflow.config import MAX_CONFIG_BYTES, ConfigError, config_from_dict, load_config
from alflow.neighbors import NeighborListError, batch_neighbor_list, neighbor_list

ROOT = str(Path(__file__).resolve().parents[2])
MINIMAL = "name: x\nsystem: {build: {element: Cu, crystal: fcc, a: 3.61, cubic: true}}\n"


def _laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ",".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _in_subprocess(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("where", ["name", "hparams"])
def test_billion_laughs_fails_fast_with_a_config_error(tmp_path, where):
    body = MINIMAL.replace("name: x", "name: *l8") if where == "name" else MINIMAL + "potential: {hparams: {x: *l8}}\n"
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs() + body)
    assert path.stat().st_size < 1000  # tiny file, 9^9 values once expanded
    done = _in_subprocess(f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (3_000_000_000, 3_000_000_000))
        from alflow.config import ConfigError, load_config
        t0 = time.monotonic()
        try:
            load_config({str(path)!r})
        except ConfigError as err:
            print(f"{{time.monotonic() - t0:.3f}}", err)
        else:
            print("accepted")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, message = done.stdout.split(" ", 1)
    assert float(seconds) < 2.0
    assert "too large a configuration" in message and "aliases" in message and str(path) in message


def test_a_recursive_alias_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(MINIMAL + "potential: {hparams: &h {x: *h}}\n")
    with pytest.raises(ConfigError, match="alias refers to a node that contains it"):
        load_config(path)


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(MINIMAL + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path)


def test_ordinary_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(MINIMAL + "exploration:\n  walkers:\n    - &w {temperature: 300, steps: 20, stride: 5}\n    - *w\n")
    assert len(load_config(path).exploration.walkers) == 2


@pytest.mark.parametrize(("section", "values", "field"), [
    ("potential", {"cutoff": 1e6}, "potential.cutoff"),
    ("potential", {"cutoff": float("nan")}, "potential.cutoff"),
    ("potential", {"cutoff": float("inf")}, "potential.cutoff"),
    ("exploration", {"walkers": [{"temperature": 1e9}]}, "exploration.walkers.0.temperature"),
    ("exploration", {"walkers": [{"temperature": [300, float("nan")]}]}, "exploration.walkers.0.temperature"),
    ("exploration", {"walkers": [{"timestep": 1e5}]}, "exploration.walkers.0.timestep"),
    ("exploration", {"walkers": [{"steps": 10**13}]}, "exploration.walkers.0.steps"),
    ("exploration", {"walkers": [{"ensemble": "npt-iso", "pressure": -1e9}]}, "exploration.walkers.0.pressure"),
    ("exploration", {"min_distance": float("inf")}, "exploration.min_distance"),
    ("training", {"lr": float("nan")}, "training.lr"),
    ("labelling", {"timeout_s": float("inf")}, "labelling.timeout_s"),
    ("labelling", {"kpoint_density": 1e9}, "labelling.kpoint_density"),
    ("selection", {"lower": float("nan")}, "selection.lower"),
    ("system", {"build": {"element": "Cu", "a": 1e8}}, "system.build.a"),
    ("system", {"build": {"element": "Cu"}, "supercell": [1000, 1000, 1000]}, "system.supercell"),
    ("committee", {"size": 10**6}, "committee.size"),
])
def test_numeric_fields_reject_nan_inf_and_absurd_magnitudes(section, values, field):
    data = {"name": "x", "system": {"build": {"element": "Cu"}}}
    data[section] = values
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert any(line.startswith(field) for line in info.value.errors), info.value.errors


def test_sensible_values_near_the_bounds_pass():
    cfg = config_from_dict({"name": "x", "system": {"build": {"element": "Cu"}}, "potential": {"cutoff": 12.0},
                            "exploration": {"walkers": [{"temperature": [300, 5000], "timestep": 5.0, "steps": 10**6}]}})
    assert cfg.potential.cutoff == 12.0


def test_an_absurd_cutoff_is_refused_by_the_neighbor_list_at_once():
    """A cutoff of 10^6 Å in a 4-atom cell would ask for ~10^18 pairs (the old code hung); fails in a subprocess."""
    done = _in_subprocess("""
        import sys
        sys.modules["torch"] = None  # alflow.neighbors runs without torch: the subprocess starts in ~1 s
        import numpy as np
        from alflow.neighbors import NeighborListError, neighbor_list
        try:
            neighbor_list(np.array([[0, 0, 0], [0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]]), np.eye(3) * 3.6, True, 1e6)
        except NeighborListError as err:
            print(err)
    """, timeout=30)
    assert done.stdout.startswith("cutoff: "), done.stdout + done.stderr


@pytest.mark.parametrize("cell", [0.1, 0.01])
def test_cells_far_smaller_than_the_cutoff_are_refused_naming_the_cutoff(cell):
    with pytest.raises(NeighborListError, match=r"cutoff: 50 Å with cell .* pairs"):
        neighbor_list(np.zeros((1, 3)), np.eye(3) * cell, True, 50.0)
    with pytest.raises(NeighborListError, match=r"cutoff: 50 Å with cells\[1\]"):
        batch_neighbor_list(np.zeros((2, 3)), np.stack([np.eye(3) * 4.0, np.eye(3) * cell]), True, [1, 1], 50.0)


def test_a_large_but_real_structure_passes_the_estimate():
    """4000 atoms of fcc Cu with a 6 Å cutoff (~0.4 M pairs) and a 60-atom molecule at 100 Å are fine."""
    from ase.build import bulk, molecule

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))
    assert len(neighbor_list(atoms.positions, atoms.cell.array, True, 6.0)) > 300_000
    c60 = molecule("C60")
    assert len(neighbor_list(c60.positions, np.zeros((3, 3)), False, 100.0)) == 60 * 59
