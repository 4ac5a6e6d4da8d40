"""Physics gates (alflow.gates): EOS, elastic constants and phonons of a calculator vs the oracle, and the loop
that converges only when every configured gate holds (real EMT labels, real tiny committees)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential
from ase.units import GPa

from alflow import gates
from alflow.config import ConfigError, GatesConfig, LoopConfig, config_from_dict
from alflow.data import Dataset
from alflow.loop import read_metrics, read_state, run_is_complete, run_loop

from test_loop import tiny_config  # noqa: E402

CU = bulk("Cu", "fcc", a=3.61, cubic=True)
EOS = {"strain": 0.04, "points": 7, "eos": "birchmurnaghan", "tol_volume": 0.01, "tol_bulk_modulus": 0.05,
       "tol_energy": None}
ELASTIC = {"delta": 0.01, "tol": 0.05, "tol_gpa": None}


def wrong() -> MorsePotential:
    """A real but wrong Cu model: a Morse pair potential with the right nearest-neighbour distance."""
    return MorsePotential(epsilon=0.3429, r0=2.555, rho0=6.0)


def test_eos_gate_against_itself_holds_and_against_a_wrong_model_fails():
    same = gates.run_gate("eos", EOS, CU, EMT(), EMT())
    assert same.passed and same.errors["volume_rel"] == 0.0 and same.errors["bulk_modulus_rel"] == 0.0
    # EMT Cu: a = 3.59 A (V0 = a^3/4), B ~ 134 GPa (ASE's EMT parameters)
    assert same.reference["v0"] == pytest.approx(3.59**3 / 4, rel=0.01)
    assert 120 < same.reference["bulk_modulus_gpa"] < 150
    off = gates.run_gate("eos", EOS, CU, wrong(), EMT())
    assert not off.passed and off.ratio > 1
    assert "FAILED" in off.describe() and "bulk_modulus_rel" in off.describe()
    # GateResult is a frozen, JSON-ready record
    assert gates.GateResult.from_dict(json.loads(json.dumps(off.to_dict()))) == off


def test_eos_energy_tolerance_is_checked_only_when_set():
    shifted = gates.run_gate("eos", {**EOS, "tol_energy": 1e-3}, CU, EMT(), EMT())
    assert shifted.passed and "energy_ev_per_atom" in shifted.tolerances
    assert "energy_ev_per_atom" not in gates.run_gate("eos", EOS, CU, EMT(), EMT()).tolerances


def _energy(atoms, strain: np.ndarray) -> float:
    a = atoms.copy()
    a.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain).T, scale_atoms=True)
    a.calc = EMT()
    return a.get_potential_energy()


def test_elastic_constants_of_emt_copper_match_an_energy_finite_difference_reference():
    """C11, C12, C44 from the gate's stress-strain fit vs second derivatives of the energy (an independent path),
    at EMT's equilibrium lattice constant (with a residual stress the two differ by terms of its order)."""
    cu = bulk("Cu", "fcc", a=(4 * gates.run_gate("eos", EOS, CU, EMT(), EMT()).reference["v0"]) ** (1 / 3),
              cubic=True)
    result = gates.run_gate("elastic", ELASTIC, cu, EMT(), EMT())
    assert result.passed and result.errors["c_max_gpa"] == 0.0
    c = np.asarray(result.reference["c_gpa"])
    h, v = 0.002, cu.get_volume()
    e0 = _energy(cu, np.zeros((3, 3)))

    def d2(strain: np.ndarray) -> float:  # second derivative of E/V along ``strain`` (GPa)
        return (_energy(cu, h * strain) - 2 * e0 + _energy(cu, -h * strain)) / (v * h * h) / GPa

    xx, yy = np.diag([1.0, 0, 0]), np.diag([0, 1.0, 0])
    shear = np.zeros((3, 3))
    shear[1, 2] = shear[2, 1] = 0.5  # engineering shear strain 1: E/V = C44 gamma^2 / 2
    c11, c44 = d2(xx), d2(shear)
    c12 = (d2(xx + yy) - 2 * c11) / 2  # E/V = (2 C11 + 2 C12) eps^2 / 2
    assert c[0, 0] == pytest.approx(c11, rel=0.01) and c[3, 3] == pytest.approx(c44, rel=0.01)
    assert c[0, 1] == pytest.approx(c12, rel=0.02)
    assert np.allclose(c, c.T, atol=0.5) and abs(c[0, 3]) < 0.5  # cubic: symmetric, no normal-shear coupling
    off = gates.run_gate("elastic", ELASTIC, CU, wrong(), EMT())
    assert not off.passed and off.errors["c_max_gpa"] > 5


def test_elastic_constants_match_matscipy_where_installed():
    elasticity = pytest.importorskip("matscipy.elasticity")
    atoms = CU.copy()
    atoms.calc = EMT()
    ref = elasticity.full_3x3x3x3_to_Voigt_6x6(elasticity.measure_triclinic_elastic_constants(atoms, delta=0.01)) / GPa
    ours = np.asarray(gates.run_gate("elastic", ELASTIC, CU, EMT(), EMT()).reference["c_gpa"])
    assert np.allclose(ours, ref, atol=0.5)


@pytest.mark.skipif(importlib.util.find_spec("phonopy") is None, reason="phonopy is not installed")
def test_phonon_gate_against_itself_holds_and_against_a_wrong_model_fails():
    spec = {"supercell": [1, 1, 1], "distance": 0.01, "qpoints": [[0, 0, 0], [0.5, 0.5, 0.5]], "tol_thz": 0.2}
    same = gates.run_gate("phonons", spec, CU, EMT(), EMT())
    freqs = np.asarray(same.reference["frequencies_thz"])
    assert same.passed and freqs.shape == (2, 12) and np.abs(freqs[0, :3]).max() < 0.05  # acoustic modes at Gamma
    assert 4 < same.reference["max_thz"] < 12
    assert not gates.run_gate("phonons", spec, CU, wrong(), EMT()).passed


def test_gate_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"loop\.gates\.elastic"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"elastic": {"tol": None}}}))
    with pytest.raises(ConfigError, match=r"loop\.gates\.eos\.points"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"eos": {"points": 3}}}))
    with pytest.raises(ConfigError, match=r"loop\.gates\.rdf"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"rdf": {}}}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "phonopy" else real(name, *a))
    with pytest.raises(ConfigError, match=r"loop\.gates\.phonons.*phonopy"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"phonons": {}}}))
    assert tuple(f for f in GatesConfig.model_fields if f != "refine") == gates.GATES  # one gate table


def gated_config(run_dir, eos: dict, loop: dict | None = None) -> dict:
    """The tiny loop with every explored frame accurate (lower = 1000 eV/Å): only the gate decides the stop."""
    return tiny_config(run_dir, selection={"lower": 1000.0, "upper": 2000.0, "max_per_iteration": 2},
                       loop={"max_iterations": 2, "convergence_fraction": 0.5, "gates": {"eos": eos, "refine": 0},
                             **(loop or {})})


def test_a_failing_gate_keeps_the_loop_going_and_its_labels_are_paid_once(tmp_path):
    run_dir = tmp_path / "run"
    # a tolerance no model meets: without the gate, iteration 0 would stop "converged"
    cfg = config_from_dict(gated_config(run_dir, {"points": 5, "tol_volume": 1e-9, "tol_bulk_modulus": 1e-9}))
    summary = run_loop(cfg)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 2
    state = read_state(run_dir)
    assert "iter_000/gate" in state["stages"] and "iter_001/gate" in state["stages"]
    g0, g1 = (state["stages"][f"iter_00{i}/gate"]["result"] for i in (0, 1))
    assert g0["n_labelled"] == 5 and g1["n_labelled"] == 0 and g0["n_frames"] == g1["n_frames"] == 5  # paid once
    rows = read_metrics(run_dir)
    assert [r["explored_converged"] for r in rows] == [True, True]
    assert [r["gates_passed"] for r in rows] == [False, False] and [r["converged"] for r in rows] == [False, False]
    eos = rows[0]["gates"]["eos"]
    assert eos["passed"] is False and eos["errors"]["volume_rel"] > eos["tolerances"]["volume_rel"] == 1e-9
    assert eos["reference"]["v0"] == pytest.approx(3.59**3 / 4, rel=0.01) and eos["model"]["bulk_modulus_gpa"] > 0
    # the gate's labels are in the dataset (origin gate:eos) and in the budget
    frames = Dataset(run_dir / "dataset", create=False).frames()
    assert sum(a.info.get("origin") == "gate:eos" for a in frames) == 5  # labelling keeps the source as origin
    assert rows[-1]["labels_total"] == 4 + 5 == summary["labels"]
    assert (run_dir / "iter_000/gate/gates.json").is_file()

    # the report shows the gates: a table and a plot per gate
    from alflow.report import write_report

    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "## Convergence gates" in md and "FAILED" in md and (run_dir / "report/gate_eos.png").is_file()
    assert f"v0 {eos['reference']['v0']:.4g}" in md  # the oracle's value in the gates table
    assert run_is_complete(cfg)


def test_gates_that_hold_let_the_loop_stop(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(gated_config(run_dir, {"points": 5, "tol_volume": 10.0, "tol_bulk_modulus": 10.0},
                                        loop={"max_labels": 20}))
    summary = run_loop(cfg)
    assert summary["status"] == "converged" and summary["iterations"] == 1
    row = read_metrics(run_dir)[0]
    assert row["gates_passed"] is True and row["converged"] and row["gates"]["eos"]["passed"]
    assert row["labels_total"] == 9 and row["gate_labels"] == 5 and not row["labelled"]
    assert read_state(run_dir)["status"] == "converged"


def test_gate_labels_reach_max_labels(tmp_path):
    """4 rattled + 5 gate labels reach a cap of 9 before any selection: the run stops there, gates failing."""
    capped = config_from_dict(gated_config(tmp_path / "capped", {"points": 5, "tol_volume": 1e-9,
                                                                 "tol_bulk_modulus": 1e-9},
                                           loop={"max_labels": 9}))
    summary = run_loop(capped)
    assert summary["status"] == "max_labels" and summary["labels"] == 9 and summary["iterations"] == 1


def test_loop_config_without_gates_converges_as_before():
    loop = LoopConfig(convergence_fraction=0.5)
    row = {"n_explored": 10, "accurate_fraction": 0.9, "walker_status": {"DONE": 1}}
    from alflow.loop import is_converged

    assert is_converged(row, loop)
    gated = LoopConfig(convergence_fraction=0.5, gates={"eos": {}})
    assert not is_converged(row, gated)  # no gate value yet: not converged
    assert not is_converged({**row, "gates": {"eos": {"passed": False}}}, gated)
    assert is_converged({**row, "gates": {"eos": {"passed": True}}}, gated)


def test_preflight_names_a_gate_structure_that_cannot_be_used(tmp_path):
    from ase.io import write

    from alflow.preflight import problems

    write(tmp_path / "nacl.extxyz", bulk("NaCl", "rocksalt", a=5.64))
    cfg = config_from_dict(tiny_config(tmp_path / "run", loop={"gates": {
        "eos": {"structure": str(tmp_path / "missing.cif")},
        "elastic": {"structure": str(tmp_path / "nacl.extxyz")}}}))
    found = problems(cfg)
    assert any(p.startswith("loop.gates.eos.structure:") and "no such file" in p for p in found)
    assert any(p.startswith("loop.gates.elastic.structure:") and "[11, 17]" in p for p in found)
    assert not any("loop.gates" in p for p in problems(config_from_dict(tiny_config(
        tmp_path / "run", loop={"gates": {"eos": {}, "elastic": {}}}))))


def test_every_stage_has_a_prefect_task_and_a_timeout(tmp_path):
    """The gate stage is in the stage table, so the flow needs its task (flows.tasks) and its timeout."""
    tasks = pytest.importorskip("flows.tasks")
    from alflow.results import STAGES

    cfg = config_from_dict(tiny_config(tmp_path / "run", loop={"gates": {"eos": {}, "elastic": {}}}))
    assert tuple(tasks.TASKS) == STAGES and set(tasks.stage_timeouts(cfg)) == set(STAGES)
    assert tasks.gate_frames(cfg) == 7 + 12


# ----------------------------------------------------------------------------------------- rdf

RDF = {"temperature": 600.0, "timestep": 4.0, "equilibration": 50, "steps": 200, "samples": 8, "seed": 0,
       "friction": 0.02, "rmax": 4.5, "bins": 60, "tol": 0.15, "tol_peak": 0.05}


def test_rdf_gate_of_emt_against_itself_at_another_seed_holds_and_a_wrong_model_fails():
    from ase.calculators.lj import LennardJones

    from alflow.gate_md import sample

    # the same physics sampled with other thermostat noise: only statistical differences
    reference = sample(gates.structures("rdf", RDF, CU)[0], EMT(), {**gates.rdf_md(RDF), "seed": 1})
    other_seed = gates.run_gate("rdf", RDF, CU, EMT(), reference)
    assert other_seed.passed, other_seed.describe()
    assert 2.4 < other_seed.reference["first_peak_r"] < 2.7  # Cu nearest neighbours at a/sqrt(2) = 2.55 A
    assert other_seed.reference["frames"] == 8 and len(other_seed.model["g"]) == 60
    # a Lennard-Jones "copper" with its minimum at 2.9 A in the same fixed cell: other vibrations, another g(r)
    off = gates.run_gate("rdf", RDF, CU, LennardJones(sigma=2.9 / 2 ** (1 / 6), epsilon=0.4, rc=4.5), EMT())
    assert not off.passed and off.errors["rdf_l1_rel"] > 0.5 and off.ratio > 1, off.describe()
    assert off.errors["first_peak_shift_a"] > other_seed.errors["first_peak_shift_a"]


def test_rdf_start_structure_is_wider_than_twice_rmax():
    start = gates.structures("rdf", RDF, CU)[0]
    assert len(start) == 27 * len(CU)  # the 3.61 A cubic cell -> 3 x 3 x 3 (10.8 A > 9 A) for rmax 4.5 A
    widths = start.cell.volume / np.linalg.norm(np.cross(start.cell[[1, 2, 0]], start.cell[[2, 0, 1]]), axis=1)
    assert widths.min() > 2 * RDF["rmax"]


def test_rdf_gate_config_is_validated():
    with pytest.raises(ConfigError, match="loop.gates.rdf.samples"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"rdf": {"temperature": 300, "steps": 5, "samples": 10}}}))
    with pytest.raises(ConfigError, match="loop.gates.rdf.temperature"):
        config_from_dict(tiny_config("/tmp/x", loop={"gates": {"rdf": {}}}))


def test_rdf_gate_in_the_loop_pays_the_oracle_md_once(tmp_path):
    run_dir = tmp_path / "run"
    rdf = {"temperature": 300.0, "equilibration": 20, "steps": 60, "samples": 3, "rmax": 3.0, "bins": 30, "tol": 1e-6}
    cfg = config_from_dict(gated_config(run_dir, None, loop={"gates": {"rdf": rdf}}))
    summary = run_loop(cfg)
    assert summary["status"] == "max_iterations" and summary["iterations"] == 2  # tol 1e-6: the gate fails
    state = read_state(run_dir)
    g0, g1 = (state["stages"][f"iter_00{i}/gate"]["result"] for i in (0, 1))
    assert g0["n_labelled"] == 3 and g1["n_labelled"] == 0 and g0["n_frames"] == g1["n_frames"] == 3  # paid once
    rows = read_metrics(run_dir)
    assert [r["gates"]["rdf"]["passed"] for r in rows] == [False, False]
    assert rows[0]["gates"]["rdf"]["errors"]["rdf_l1_rel"] > 1e-6 and rows[0]["gates"]["rdf"]["reference"]["frames"] == 3
    stored = [a for a in Dataset(run_dir / "dataset", create=False).frames() if a.info.get("origin") == "gate:rdf"]
    assert len(stored) == 3 and all(a.info["labeller"] == "emt" and "REF_stress" in a.info for a in stored)
    assert rows[-1]["labels_total"] == summary["labels"] and rows[0]["gate_labels"] == 3


def test_a_killed_oracle_md_keeps_its_sampled_frames_and_fails_the_rdf_gate(tmp_path):
    """The oracle's MD hits the gate's timeout: the frames it sampled are labels in the dataset, the gate fails."""
    from pathlib import Path

    from ase.calculators.emt import EMT as ModelStandIn

    from alflow.stages import _rdf_gate

    fixtures = str(Path(__file__).resolve().parent)
    # 0.02 s per oracle call, a sample every 10 steps: 80 s in all, killed after 10 s (the worker starts in 1-5 s)
    rdf = {"temperature": 300.0, "equilibration": 0, "steps": 4000, "samples": 400, "rmax": 3.0, "bins": 30,
           "timeout_s": 10.0}
    cfg = config_from_dict(tiny_config(tmp_path / "run", loop={"gates": {"rdf": rdf}}, labelling={
        "oracle": "oracle_fixtures:SleepyEMT", "parameters": {"delay": 0.02, "worker_pythonpath": fixtures}}))
    ds = Dataset(tmp_path / "dataset")
    result, used, new, model_frames = _rdf_gate(cfg, cfg.loop.gates.rdf, ds, tmp_path / "gate", 0, ModelStandIn())
    assert model_frames == []  # the committee's MD is not run without the oracle's
    assert not result.passed and "timed out after 10 s" in result.message, result.message
    stored = [a for a in ds.frames() if a.info.get("origin") == "gate:rdf"]
    assert 0 < len(stored) == new < 400 and used == 0  # kept, but not enough for the gate
    assert all(a.info["labeller"] == "oracle_fixtures:SleepyEMT" and np.isfinite(a.arrays["REF_forces"]).all()
               for a in stored)


def test_a_failing_gate_offers_frames_near_its_structures_when_nothing_else_is_selected(tmp_path):
    """Every explored frame trusted, the eos gate failing: its neighbourhood is labelled instead of nothing."""
    run_dir = tmp_path / "run"
    cfg = config_from_dict(gated_config(run_dir, None, loop={
        "max_iterations": 2, "gates": {"eos": {"points": 5, "tol_volume": 1e-9, "tol_bulk_modulus": 1e-9},
                                       "refine": 3}}))
    summary = run_loop(cfg)
    state = read_state(run_dir)
    s0 = state["stages"]["iter_000/select"]["result"]
    assert s0["n_from_gates"] == 2 == s0["n_selected"]  # 3 offered, the budget (max_per_iteration 2) takes 2
    rows = read_metrics(run_dir)
    assert rows[0]["labels_added"] == 2 and summary["labels"] == 4 + 5 + 2
    stored = [a for a in Dataset(run_dir / "dataset", create=False).frames() if a.info.get("origin") == "gate-refine"]
    assert len(stored) == 2
    eos_volumes = {round(f.get_volume(), 6) for f in gates.structures("eos", cfg.loop.gates.eos,
                                                                           gates_structure(cfg))}
    # near the E-V points: volumes within half a point spacing (strain 0.04 over 5 points: +-1 % in length)
    v = sorted(eos_volumes)
    assert all(min(abs(a.get_volume() - x) for x in v) <= 0.031 * a.get_volume() for a in stored)
    # iteration 1: the gate stage offers new frames (another seed), none of them stored yet
    g1 = state["stages"]["iter_001/gate"]["result"]
    assert g1["refine"] and g1["n_labelled"] == 0


def gates_structure(cfg):
    from alflow.stages import gate_structure

    return gate_structure(cfg, cfg.loop.gates.eos)


def test_refinement_frames_are_seeded_rattled_copies_and_rdf_offers_none():
    a = gates.refinement_frames("eos", EOS, CU, 5, seed=1)
    b = gates.refinement_frames("eos", EOS, CU, 5, seed=1)
    assert len(a) == 5 and all(np.allclose(x.positions, y.positions) for x, y in zip(a, b))
    assert not np.allclose(a[0].positions, gates.refinement_frames("eos", EOS, CU, 5, seed=2)[0].positions)
    base = gates.structures("elastic", ELASTIC, CU)
    for f in gates.refinement_frames("elastic", ELASTIC, CU, 4, seed=0):
        assert any(np.allclose(f.cell, b.cell) for b in base)  # the cell of one of the 12 strained structures
        disp = min(np.abs(f.positions - b.positions).max() for b in base if np.allclose(f.cell, b.cell))
        assert 0 < disp < 0.2  # rattled, not rebuilt
    assert gates.refinement_frames("rdf", {}, CU, 4, seed=0) == [] and gates.refinement_frames("eos", EOS, CU, 0, 0) == []
