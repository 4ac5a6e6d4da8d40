"""benchmarks/active_vs_random.py, its pure parts: the CuNi alloy generator, the aggregate over seeds, the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT

from alflow.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("active_vs_random_benchmark",
                                                  ROOT / "benchmarks" / "active_vs_random.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_alloy_cell_composition_seeded_periodic(bench) -> None:
    a = bench.alloy_cell(0.5, np.random.default_rng(3))
    assert len(a) == 32 and a.pbc.all()
    assert a.get_chemical_formula() == "Cu16Ni16"
    assert np.allclose(np.diag(a.cell.array), 2 * (3.61 + 3.52) / 2)  # Vegard at x = 0.5, cubic 2x2x2
    same = bench.alloy_cell(0.5, np.random.default_rng(3))
    other = bench.alloy_cell(0.5, np.random.default_rng(4))
    assert (same.numbers == a.numbers).all()
    assert (other.numbers != a.numbers).any()  # composition disorder: the sites differ with the seed
    assert bench.alloy_cell(0.25, np.random.default_rng(0)).get_chemical_formula() == "Cu24Ni8"
    assert bench.alloy_cell(0.75, np.random.default_rng(0)).get_chemical_formula() == "Cu8Ni24"
    # a real EMT cell: periodic images seen (the relaxed lattice has no net force, only small alloy forces)
    a.calc = EMT()
    assert np.isfinite(a.get_potential_energy())
    with pytest.raises(InputError, match="x_ni"):
        bench.alloy_cell(1.5, np.random.default_rng(0))


def test_start_alloys_are_the_loops_structures(bench, tmp_path: Path) -> None:
    from alflow.config import config_from_dict
    from alflow.explore.runner import system_structures, walker_starts

    args = bench.parse_args(["--quick", "--system", "cuni"])
    config = config_from_dict(bench.base_config(args, "cuni", "shallow", 1, tmp_path / "run"))
    assert config.committee.kind == "shallow" and config.committee.heads == 4
    assert config.selection.strategy == "committee" and config.exploration.engine == "batched"
    structures = system_structures(config.system)
    assert len(structures) == bench.N_START_ALLOYS
    assert [s.get_chemical_formula() for s in structures] == ["Cu16Ni16", "Cu20Ni12", "Cu12Ni20", "Cu16Ni16"]
    assert len({tuple(s.numbers) for s in structures}) == bench.N_START_ALLOYS
    starts = walker_starts(config, structures)
    assert sorted({len(atoms) for _, atoms, _, _ in starts}) == [31, 32]  # the vacancy walker works on an alloy
    random = config_from_dict(bench.base_config(args, "cuni", "random", 1, tmp_path / "r"))
    assert random.selection.strategy == "random" and random.committee.kind == "full"


def test_start_compositions_and_upper_reach_the_run(bench, tmp_path: Path) -> None:
    """--start-compositions: the start cells (and so the initial set and every walker) at the given Ni fractions;
    --upper: selection.upper."""
    from alflow.config import config_from_dict
    from alflow.explore.runner import system_structures, walker_starts

    args = bench.parse_args(["--quick", "--system", "cuni", "--start-compositions", "0.5", "0.25", "0.75", "0.5"])
    config = config_from_dict(bench.base_config(args, "cuni", "committee", 0, tmp_path / "wide"))
    structures = system_structures(config.system)
    assert [s.get_chemical_formula() for s in structures] == ["Cu16Ni16", "Cu24Ni8", "Cu8Ni24", "Cu16Ni16"]
    ni = sorted({round(float((a.numbers == 28).mean()), 2) for _, a, _, _ in walker_starts(config, structures)})
    assert ni[0] == 0.25 and ni[-1] >= 0.75  # the walkers explore the test set's compositions (x = 0.25 ... 0.75)
    assert config.selection.upper == 2.0
    narrow = bench.parse_args(["--quick", "--system", "cu", "--upper", "0.5"])
    assert config_from_dict(bench.base_config(narrow, "cu", "committee", 0, tmp_path / "narrow")).selection.upper == 0.5
    bad = bench.parse_args(["--system", "cuni", "--start-compositions", "0.5", "1.5"])
    with pytest.raises(InputError, match="x_ni"):
        bench.base_config(bad, "cuni", "committee", 0, tmp_path / "bad")


def _record(system: str, strategy: str, seed: int, rmse: list[float], step: int = 10) -> dict:
    curve = [{"iteration": i, "labels": step * (i + 1), "forces_rmse": r, "energy_mae_meV": 1.0}
             for i, r in enumerate(rmse)]
    return {"system": system, "strategy": strategy, "seed": seed, "status": "max_iterations", "seconds": 60.0,
            "curve": curve, "args": {}}


def test_aggregate_mean_spread_and_reached(bench) -> None:
    curves = [_record("cu", "committee", k, r)["curve"]
              for k, r in enumerate([[0.1, 0.04, 0.02], [0.1, 0.06, 0.03], [0.2, 0.1, 0.09]])]
    agg = bench.aggregate(curves, 0.05)
    assert agg == {"mean": 25.0, "min": 20, "max": 30, "reached": 2, "n": 3}
    assert bench.aggregate(curves, 0.01) == {"mean": None, "min": None, "max": None, "reached": 0, "n": 3}
    assert bench.aggregate(curves, 0.5)["mean"] == 10.0


def test_table_only_from_result_files(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for k in range(3):
        for strategy, rmse in (("committee", [0.1, 0.04, 0.02]), ("shallow", [0.1, 0.08, 0.04]),
                               ("random", [0.1, 0.09, 0.06, 0.04])):
            path = tmp_path / f"cuni_{strategy}_seed{k}.json"
            path.write_text(json.dumps(_record("cuni", strategy, k, rmse, step=10 + k)))
    assert bench.main(["--table-only", "--system", "cuni", "--results", str(tmp_path), "--target", "0.05",
                       "--also-targets", "0.03", "--plot", str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 0.05 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # committee reaches 0.05 at iteration 1 (labels 20, 22, 24), shallow at 2 (30, 33, 36), random at 3 (40, 44, 48)
    assert cells[1] == "22 ± [20–24] (3/3 reached)"
    assert cells[2] == "33 ± [30–36] (3/3 reached)"
    assert cells[3] == "44 ± [40–48] (3/3 reached)"
    assert cells[4] == f"{44 / 22:.2f}" and cells[5] == f"{44 / 33:.2f}"
    row = next(line for line in out.splitlines() if line.startswith("| 0.03 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["33 ± [30–36] (3/3 reached)", "not reached (0/3)", "not reached (0/3)"]
    assert cells[4:] == [f"> {48 / 33:.2f}", "—"]  # random's most labels (48) / committee's mean
    assert (tmp_path / "curve.png").stat().st_size > 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cu_random_seed0.json").write_text(json.dumps({"system": "cu"}))
    with pytest.raises(InputError, match="strategy"):
        bench.main(["--table-only", "--results", str(bad)])


def test_verdict_at_randoms_tightest_target_and_looser_ones(bench) -> None:
    def runs(committee: list[list[float]]) -> dict:
        out = {"random": {k: _record("cu", "random", k, r) for k, r in enumerate([[0.1, 0.05, 0.03, 0.021],
                                                                                  [0.1, 0.07, 0.04, 0.02491]])},
               "committee": {k: _record("cu", "committee", k, r) for k, r in enumerate(committee)}}
        return out

    assert bench.tightest_random_target(runs([[0.1]])) == 0.025  # the worse random seed's best, rounded up
    good = runs([[0.1, 0.02], [0.1, 0.024]])
    lines = bench.verdict(good, [0.05, 0.03])
    assert lines[0].startswith("Random reaches 0.025 eV/Å on every seed (40 ± [40–40] (2/2 reached))")
    assert "random / committee = 2.00 (target >= 2: met)" in lines[1] and "never more labels" in lines[1]
    # a committee that needs more labels than random's worst seed at a looser target, and misses a seed
    bad = runs([[0.1, 0.09, 0.08, 0.02], [0.2, 0.2, 0.2, 0.2]])
    line = bench.verdict(bad, [0.05, 0.03])[1]
    assert "(1/2 reached)" in line and "target >= 2: not met" in line
    assert "more labels than random's worst seed at 0.05;" in line  # 40 > 30; at 0.03 40 = 40
    assert "not reached on every seed at 0.05, 0.03" in line  # the second seed stays at 0.2
    assert "| 0.025 |" in bench.table("cu", good, [0.05])


def test_random_from_another_results_folder(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir(), other.mkdir()
    (mine / "cu_committee_seed0.json").write_text(json.dumps(_record("cu", "committee", 0, [0.1, 0.04])))
    (mine / "cu_random_seed0.json").write_text(json.dumps(_record("cu", "random", 0, [0.1, 0.09, 0.08, 0.07])))
    (other / "cu_random_seed0.json").write_text(json.dumps(_record("cu", "random", 0, [0.1, 0.09, 0.04])))
    assert bench.main(["--table-only", "--system", "cu", "--results", str(mine), "--random-from", str(other),
                       "--target", "0.05"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.05 |"))
    assert "30 ± [30–30] (1/1 reached)" in row and "| 1.50 |" in row  # other's random (30 labels), not mine's


def test_breakdown_groups_by_composition_and_kind(bench) -> None:
    """benchmarks/active_vs_random_breakdown.py: every test frame lands in one composition bin and one kind."""
    spec = importlib.util.spec_from_file_location("avr_breakdown", ROOT / "benchmarks" / "active_vs_random_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    frames = []
    for x, kind in [(0.25, "md"), (0.5, "strained"), (0.75, "vacancy"), (0.5, "md")]:
        a = bench.alloy_cell(x, np.random.default_rng(1))
        a.info["test_kind"] = kind
        frames.append(a)
    groups = module.groups_of(frames)
    assert {k: len(v) for k, v in groups.items()} == {"x0.25": 1, "md": 2, "x0.5": 2, "strained": 1, "x0.75": 1,
                                                      "vacancy": 1}
