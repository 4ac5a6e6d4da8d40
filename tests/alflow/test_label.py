"""Labelling with isolation, failure records, retries and resume (alflow.label), on ASE EMT Cu cells.

Misbehaving oracles live in tests/alflow/oracle_fixtures.py and reach the label
workers through the ``worker_pythonpath`` parameter. No mocks: every label is a
real EMT calculation in a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones

from alflow.cli import main
from alflow.config import LabellingConfig
from alflow.data import Dataset
from alflow.io import frame_hash
from alflow.keys import LABELLER, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE, STATUS, TIMESTAMP
from alflow.label import FAILURES, label_frames, read_failures, reference_energies, run_calculation
from alflow.oracles import gamma_centred_points, kpoint_grid

sys.path.insert(0, str(Path(__file__).parent))
from oracle_fixtures import harmonic_energy  # noqa: E402

HERE = str(Path(__file__).parent)


def cu_frames(n: int, repeat: int = 1, seed: int = 0) -> list:
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
        atoms.rattle(0.05, seed=seed + i)
        atoms.info.update(walker=i % 2, step=10 * i, iteration=1, source="md")
        out.append(atoms)
    return out


def fixture_cfg(name: str, **params) -> LabellingConfig:
    return LabellingConfig(oracle=f"oracle_fixtures:{name}", parameters={"worker_pythonpath": HERE, **params},
                           retries=0, timeout_s=60)


def shard_frame_count(ds: Dataset) -> int:
    return sum(len(ase.io.read(p, index=":")) for p in sorted((ds.path / "shards").glob("*.extxyz")))


def test_emt_labels_equal_a_direct_call_with_provenance(tmp_path):
    frames = cu_frames(3)
    res = label_frames(frames, LabellingConfig(oracle="emt"), tmp_path / "ds", tmp_path / "work", progress=False)
    assert (res.n_labelled, res.n_failed, res.n_skipped) == (3, 0, 0)
    stored = {a.info["frame_hash"]: a for a in Dataset(tmp_path / "ds").frames()}
    for atoms in frames:
        got = stored[frame_hash(atoms)]
        ref = atoms.copy()
        ref.calc = EMT()
        assert got.info[REF_ENERGY] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(got.arrays[REF_FORCES], ref.get_forces(), atol=1e-7)
        np.testing.assert_allclose(got.info[REF_STRESS], ref.get_stress(voigt=True), atol=1e-9)
        assert got.info[LABELLER] == "emt" and got.info[SOURCE] == "reference" and got.info[STATUS] == "labelled"
        assert got.info["origin"] == "md" and got.info["walker"] == atoms.info["walker"] and TIMESTAMP in got.info
    assert not list((tmp_path / "work" / "scratch").iterdir())  # successful scratch dirs are removed
    again = label_frames(frames, LabellingConfig(oracle="emt"), tmp_path / "ds", tmp_path / "work", progress=False)
    assert (again.n_labelled, again.n_skipped, again.n_attempts) == (0, 3, 0)


def test_import_path_oracle_and_no_stress_for_non_periodic_frames(tmp_path):
    frames = cu_frames(1)
    molecule = frames[0].copy()
    molecule.pbc = False
    cfg = LabellingConfig(oracle="ase.calculators.lj:LennardJones", parameters={"sigma": 2.3, "epsilon": 0.4, "rc": 6.0})
    res = label_frames([frames[0], molecule], cfg, tmp_path / "ds", tmp_path / "w", progress=False)
    assert res.n_labelled == 2
    stored = {a.info["frame_hash"]: a for a in Dataset(tmp_path / "ds").frames()}
    for atoms in (frames[0], molecule):
        ref = atoms.copy()
        ref.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=6.0)
        got = stored[frame_hash(atoms)]
        assert got.info[REF_ENERGY] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        assert (REF_STRESS in got.info) == bool(atoms.pbc.all())
        assert got.info[LABELLER] == "ase.calculators.lj:LennardJones"


def test_segfaulting_oracle_is_recorded_and_the_flow_continues(tmp_path):
    frames = cu_frames(3)
    bad = frames[1]
    bad.numbers[0] = 13  # Al: CrashOnAl takes the worker down with SIGSEGV
    res = label_frames(frames, fixture_cfg("CrashOnAl"), tmp_path / "ds", tmp_path / "w", progress=False)
    assert (res.n_labelled, res.n_failed) == (2, 1)
    ds = Dataset(tmp_path / "ds")
    assert frame_hash(bad) not in ds.hashes and len(ds) == 2
    (rec,) = read_failures(res.failures)
    assert rec["frame_hash"] == frame_hash(bad) and rec["status"] == "crash" and rec["final"] is True
    assert "killed by signal SIGSEGV" in rec["error"] and rec["attempt"] == 0 and rec["walker"] == 1
    assert Path(rec["scratch"]).is_dir()  # failed scratch dirs are kept for inspection
    # a rerun does not try the finally-failed frame again, unless asked to
    again = label_frames(frames, fixture_cfg("CrashOnAl"), tmp_path / "ds", tmp_path / "w", progress=False)
    assert (again.n_skipped, again.n_attempts) == (3, 0)
    retry = label_frames(frames, fixture_cfg("CrashOnAl"), tmp_path / "ds", tmp_path / "w", progress=False,
                         retry_failed=True)
    assert (retry.n_attempts, retry.n_failed) == (1, 1)


def test_oracle_exiting_without_result_is_a_crash(tmp_path):
    atoms = cu_frames(1)[0]
    atoms.numbers[0] = 13
    out = run_calculation(atoms, "oracle_fixtures:CrashOnAl", {"worker_pythonpath": HERE, "how": "exit"}, tmp_path / "t")
    assert out.status == "crash" and "exited with status 3" in out.error and out.result is None


def test_timeout_kills_the_calculation_within_the_limit(tmp_path):
    cfg = fixture_cfg("SleepyEMT", delay=60).model_copy(update={"timeout_s": 2.0})
    t0 = time.monotonic()
    res = label_frames(cu_frames(1), cfg, tmp_path / "ds", tmp_path / "w", progress=False)
    elapsed = time.monotonic() - t0
    assert res.n_failed == 1 and res.n_labelled == 0
    assert elapsed < 2.0 + 8.0, elapsed  # timeout + slack (process start, kill, bookkeeping)
    (rec,) = read_failures(res.failures)
    assert rec["status"] == "timeout" and "2 s" in rec["error"] and 1.9 < rec["elapsed_s"] < 2.0 + 5.0


def test_fallback_parameters_used_on_retry(tmp_path):
    cfg = LabellingConfig(oracle="oracle_fixtures:FlakyEMT", parameters={"worker_pythonpath": HERE, "mixing_beta": 0.7},
                          retries=2, fallback_parameters=[{"mixing_beta": 0.1}], timeout_s=60)
    frames = cu_frames(1)
    res = label_frames(frames, cfg, tmp_path / "ds", tmp_path / "w", progress=False)
    assert (res.n_labelled, res.n_failed, res.n_attempts) == (1, 0, 2)
    (rec,) = read_failures(res.failures)
    assert rec["status"] == "scf_not_converged" and rec["attempt"] == 0 and rec["final"] is False
    assert rec["parameters"]["mixing_beta"] == 0.7 and "mixing_beta=0.7" in rec["log_tail"]
    (got,) = Dataset(tmp_path / "ds").frames()
    assert got.info["attempt"] == 1
    ref = frames[0].copy()
    ref.calc = EMT()
    assert got.info[REF_ENERGY] == pytest.approx(ref.get_potential_energy(), abs=1e-8)


def test_missing_stress_is_a_failure_not_a_label(tmp_path):
    out = run_calculation(cu_frames(1)[0], "oracle_fixtures:NoStressEMT", {"worker_pythonpath": HERE}, tmp_path / "t")
    assert out.status == "missing_stress" and out.result is None


def test_killed_labelling_run_resumes_without_loss_or_duplicates(tmp_path):
    frames = cu_frames(12)
    src = tmp_path / "frames.extxyz"
    ase.io.write(src, frames)
    ds_dir, work = tmp_path / "ds", tmp_path / "work"
    cmd = [sys.executable, "-m", "alflow.cli", "label", str(src), "--dataset", str(ds_dir), "--workdir", str(work),
           "--oracle", "oracle_fixtures:SleepyHarmonic", "--param", f"worker_pythonpath={HERE}", "--param", "delay=0.3",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    ds = Dataset(ds_dir)
    while time.monotonic() < deadline and len(ds) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(ds)
    assert 3 <= n_before < 12, n_before
    time.sleep(1.5)  # the watchdog of the orphaned worker kills it within ~0.5 s
    assert not worker_pids(work)
    assert main(["label", str(src), "--dataset", str(ds_dir), "--workdir", str(work), "--oracle",
                 "oracle_fixtures:SleepyHarmonic", "--param", f"worker_pythonpath={HERE}", "--param", "delay=0.3",
                 "--no-progress"]) == 0
    ds = Dataset(ds_dir)
    assert ds.hashes == {frame_hash(a) for a in frames}
    for atoms in ds.frames():
        assert atoms.info[REF_ENERGY] == pytest.approx(harmonic_energy(atoms), abs=1e-6)
    assert shard_frame_count(ds) == 12  # every frame written exactly once: nothing repeated
    done = [json.loads(line)["frame_hash"] for line in (work / "labelled.jsonl").read_text().splitlines()]
    assert sorted(done) == sorted(set(done)) and len(done) == 12
    assert not (work / FAILURES).exists()


def worker_pids(work: Path) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and str(work).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def test_ctrl_c_stops_calculations_in_flight_without_failure_records(tmp_path):
    src = tmp_path / "f.extxyz"
    ase.io.write(src, cu_frames(2))
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "alflow.cli", "label", str(src), "--dataset", str(tmp_path / "ds"), "--workdir",
           str(work), "--oracle", "oracle_fixtures:SleepyHarmonic", "--param", f"worker_pythonpath={HERE}",
           "--param", "delay=60", "--workers", "2", "--no-progress"]
    # a runner started in the background (bash `cmd &`) passes SIGINT on as ignored: restore the default
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    # wait until both workers are really running (task files written AND worker processes alive)
    while time.monotonic() < deadline and (len(list((work / "scratch").glob("*/task.json"))) < 2 or len(worker_pids(work)) < 3):  # the labelling process + 2 workers
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"interrupted" in err
    assert time.monotonic() - t0 < 10
    assert not worker_pids(work) and not (work / FAILURES).exists()


def test_parallel_workers_and_cli_params(tmp_path, capsys):
    frames = cu_frames(4)
    src = tmp_path / "f.extxyz"
    ase.io.write(src, frames)
    rc = main(["label", str(src), "--dataset", str(tmp_path / "ds"), "--oracle", "ase.calculators.lj:LennardJones",
               "--param", "sigma=2.3", "--param", "rc=6", "--workers", "2", "--no-progress"])
    assert rc == 0
    assert "labelled 4, failed 0" in capsys.readouterr().out
    got = {a.info["frame_hash"]: a for a in Dataset(tmp_path / "ds").frames()}
    ref = ase.io.read(src, index=2)  # positions as written to the file
    ref.calc = LennardJones(sigma=2.3, rc=6.0)
    assert got[frame_hash(ref)].info[REF_ENERGY] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    assert main(["label", str(src), "--dataset", str(tmp_path / "ds"), "--oracle", "nonsense"]) == 2
    assert "unknown oracle" in capsys.readouterr().err


def test_reference_energies_are_cached(tmp_path):
    cfg = LabellingConfig(oracle="emt")
    e0 = reference_energies(cfg, ["Cu", "Al"], cache_dir=tmp_path)
    atom = bulk("Cu").repeat(1)[:1]
    atom.center(vacuum=5.0)
    atom.pbc = False
    atom.calc = EMT()
    assert e0["Cu"] == pytest.approx(atom.get_potential_energy(), abs=1e-10)
    cache = json.loads((tmp_path / "reference_energies.json").read_text())
    (entry,) = cache.values()
    assert set(entry["energies"]) == {"Cu", "Al"}
    entry["energies"]["Cu"] = 123.0  # a second call reads the cache, computes nothing
    (tmp_path / "reference_energies.json").write_text(json.dumps(cache))
    assert reference_energies(cfg, ["Cu"], cache_dir=tmp_path) == {"Cu": 123.0}


def test_kpoint_grid_convention():
    si = bulk("Si", "diamond", a=5.43)  # |b_i| = 2π √3 / a = 2.004 Å⁻¹
    assert kpoint_grid(si.cell, si.pbc, 1.4) == (3, 3, 3)
    assert kpoint_grid(si.cell, si.pbc, 3.5) == (8, 8, 8)
    assert kpoint_grid(si.cell, si.pbc, None) == (1, 1, 1)
    slab = si.repeat((1, 1, 2))
    slab.pbc = (True, True, False)
    assert kpoint_grid(slab.cell, slab.pbc, 1.4)[2] == 1
    cell = np.diag([4.0, 8.0, 16.0])
    assert kpoint_grid(cell, True, 2.0) == (4, 2, 1)  # ceil(2 · 2π / L)
    pts = gamma_centred_points((3, 3, 3))
    assert sum(w for _, w in pts) == pytest.approx(1.0) and len(pts) == 14  # 27 points, k ≡ -k
    assert ((0.0, 0.0, 0.0), pytest.approx(1 / 27)) in [(k, w) for k, w in pts]
    assert len(gamma_centred_points((2, 2, 2))) == 8  # ±1/2 are the same point: no reduction
