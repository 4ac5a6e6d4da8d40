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
from alflow.label import (
    FAILURES,
    LabellingBusy,
    label_frames,
    labelling_lock,
    read_failures,
    reference_energies,
    run_calculation,
    scratch_dir,
    settings_key,
    settings_salt,
)
from alflow.label_worker import InvalidResult, validate_result
from alflow.oracles import OracleError, gamma_centred_points, kpoint_grid

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
    while time.monotonic() < deadline and (len(list((work / "scratch").glob("*/*-a0/task.json"))) < 2 or len(worker_pids(work)) < 3):  # the labelling process + 2 workers
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


# ------------------------------------------------------------------ hardening (issue 16, items 7-10, 14)
def label_cmd(src: Path, ds: Path, *extra: str) -> list[str]:
    return ["label", str(src), "--dataset", str(ds), "--no-progress", *extra]


def test_failures_are_keyed_by_oracle_settings_and_skips_are_explained(tmp_path, capsys):
    """A frame that failed with one setting is retried after the setting changed, and an all-skipped rerun is not 0."""
    src = tmp_path / "f.extxyz"
    ase.io.write(src, cu_frames(2))
    ds = tmp_path / "ds"
    flaky = ["--oracle", "oracle_fixtures:FlakyEMT", "--param", f"worker_pythonpath={HERE}", "--retries", "0"]
    assert main(label_cmd(src, ds, *flaky, "--param", "mixing_beta=0.7")) == 1  # both fail: SCF "not converged"
    records = read_failures(ds / "labelling" / FAILURES)
    assert len(records) == 2 and all(r["final"] and len(r["settings_key"]) == 16 for r in records)
    capsys.readouterr()
    # the same settings again: nothing is tried, the command says why, and it does not exit 0
    assert main(label_cmd(src, ds, *flaky, "--param", "mixing_beta=0.7")) == 1
    out = capsys.readouterr().out
    assert "labelled 0" in out and "skipped 2: failed before with the same oracle settings" in out
    assert "--retry-failed" in out and str(ds / "labelling" / FAILURES) in out
    assert len(read_failures(ds / "labelling" / FAILURES)) == 2  # no new attempt
    # the fixed setting: the frames are tried again and labelled
    assert main(label_cmd(src, ds, *flaky, "--param", "mixing_beta=0.1")) == 0
    assert "labelled 2, failed 0" in capsys.readouterr().out
    assert len(Dataset(ds)) == 2


def test_settings_key_is_keyed_by_an_owner_only_salt(tmp_path):
    cfg = LabellingConfig(oracle="emt", parameters={"api_key": "hunter2"})
    salt = settings_salt(tmp_path)
    assert settings_salt(tmp_path) == salt and len(salt) == 32  # made once, then read back
    assert (tmp_path / ".settings-salt").stat().st_mode & 0o077 == 0
    key = settings_key(cfg, salt)
    assert key == settings_key(cfg.model_copy(), salt) and key != settings_key(cfg, settings_salt(tmp_path / "other"))
    assert key != settings_key(cfg.model_copy(update={"parameters": {"api_key": "hunter3"}}), salt)
    assert key == settings_key(cfg.model_copy(update={"max_force_warning": 10.0}), salt)  # not a setting


def test_an_oracle_that_cannot_be_built_fails_before_any_calculation(tmp_path, capsys):
    frames = cu_frames(3)
    src = tmp_path / "f.extxyz"
    ase.io.write(src, frames)
    ds, work = tmp_path / "ds", tmp_path / "ds" / "labelling"
    rc = main(label_cmd(src, ds, "--oracle", "oracle_fixtures:NoSuchCalculator", "--param", f"worker_pythonpath={HERE}"))
    err = capsys.readouterr().err
    assert rc == 2 and "oracle_fixtures:NoSuchCalculator" in err and "NoSuchCalculator" in err
    assert "Traceback" not in err.splitlines()[0]
    rc = main(label_cmd(src, ds, "--oracle", "oracle_fixtures:SleepyHarmonic", "--param", f"worker_pythonpath={HERE}",
                        "--param", "delai=0.1"))  # a misspelt parameter
    err = capsys.readouterr().err
    assert rc == 2 and "delai" in err and "cannot be built" in err
    assert not (work / FAILURES).exists() and not (work / "labelled.jsonl").exists()
    assert not [p for p in (work / "scratch").rglob("*-a0")]  # no calculation was started
    with pytest.raises(OracleError, match="NoSuchCalculator"):
        label_frames(frames, fixture_cfg("NoSuchCalculator"), ds, work, progress=False)
    # fixed: everything is labelled at once (nothing was recorded as failed)
    rc = main(label_cmd(src, ds, "--oracle", "oracle_fixtures:SleepyHarmonic", "--param", f"worker_pythonpath={HERE}"))
    assert rc == 0 and len(Dataset(ds)) == 3


def test_a_second_labelling_process_on_the_same_dataset_fails_fast_naming_the_first(tmp_path):
    src = tmp_path / "f.extxyz"
    ase.io.write(src, cu_frames(2))
    ds_dir = tmp_path / "ds"
    work = ds_dir / "labelling"
    cmd = [sys.executable, "-m", "alflow.cli", *label_cmd(src, ds_dir, "--oracle", "oracle_fixtures:SleepyHarmonic",
                                                          "--param", f"worker_pythonpath={HERE}", "--param", "delay=3")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((work / "scratch").rglob("*-a0/task.json")):
        time.sleep(0.05)
    assert list((work / "scratch").rglob("*-a0")), "the first process never started a calculation"
    t0 = time.monotonic()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and time.monotonic() - t0 < 30
    assert f"pid {first.pid}" in second.stderr and "another process" in second.stderr
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(Dataset(ds_dir)) == 2 and not (work / FAILURES).exists()
    done = (work / "labelled.jsonl").read_text().splitlines()
    assert len(done) == 2  # each frame calculated once, no "crash" records from deleted task directories
    assert not list((work / "scratch").iterdir())  # neither process left a scratch directory


def test_scratch_directories_are_per_call_and_per_process(tmp_path):
    a, b = scratch_dir(tmp_path), scratch_dir(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "scratch" and a.name.startswith(f"{os.getpid()}-")
    with labelling_lock(tmp_path / "ds"):
        with pytest.raises(LabellingBusy, match=f"pid {os.getpid()}"):
            with labelling_lock(tmp_path / "ds"):
                pass
    with labelling_lock(tmp_path / "ds"):  # released
        pass


def test_wrong_shape_results_are_failures_and_labelling_carries_on(tmp_path, capsys):
    frames = cu_frames(3)
    frames[1].numbers[0] = 13  # Al: BadShapeOnAl returns forces of shape (4, 2)
    src = tmp_path / "f.extxyz"
    ase.io.write(src, frames)
    ds = tmp_path / "ds"
    args = label_cmd(src, ds, "--oracle", "oracle_fixtures:BadShapeOnAl", "--param", f"worker_pythonpath={HERE}",
                     "--retries", "0")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "labelled 2, failed 1" in out
    (rec,) = read_failures(ds / "labelling" / FAILURES)
    assert rec["status"] == "invalid_result" and "(4, 2)" in rec["error"] and "expected (4, 3)" in rec["error"]
    assert rec["frame_hash"] == frame_hash(frames[1]) and rec["final"]
    assert not (ds / "labelling" / "labelled.jsonl").read_text().count(frame_hash(frames[1]))  # never logged as done
    assert len(Dataset(ds)) == 2
    assert main(args) == 1 and "skipped 1: failed before" in capsys.readouterr().out  # a rerun does not crash
    for what in ("energy", "stress"):
        out = run_calculation(frames[1], "oracle_fixtures:BadShapeOnAl", {"worker_pythonpath": HERE, "what": what},
                              tmp_path / what)
        assert out.status == "invalid_result" and what in out.error and out.result is None


def test_result_validator():
    good = {"energy": np.float64(-1.5), "forces": np.zeros((2, 3)), "stress": np.arange(9.0).reshape(3, 3)}
    out = validate_result(good, 2)
    # Voigt xx yy zz yz xz xy; off-diagonals the mean of the pair, as ASE's full_3x3_to_voigt_6_stress (alflow.voigt)
    assert out["energy"] == -1.5 and out["stress"] == [0.0, 4.0, 8.0, 6.0, 4.0, 2.0]
    assert validate_result({**good, "stress": None}, 2)["stress"] is None
    assert validate_result({"energy": 1.0, "forces": None, "stress": None}, 2, forces_expected=False)["forces"] is None
    for bad, match in (({"energy": [1.0, 2.0]}, "energy of shape"), ({"energy": float("nan")}, "non-finite energy"),
                       ({"forces": np.zeros((3, 3))}, r"forces of shape \(3, 3\); expected \(2, 3\)"),
                       ({"forces": np.full((2, 3), np.inf)}, "non-finite forces"), ({"forces": None}, "no forces"),
                       ({"stress": np.zeros(5)}, "stress of shape"), ({"energy": "x"}, "not numeric")):
        with pytest.raises(InvalidResult, match=match):
            validate_result({**good, **bad}, 2)


def test_absurd_forces_are_reported_and_impossible_structures_never_reach_the_oracle(tmp_path, caplog, capsys):
    close = bulk("Cu", "fcc", a=3.61, cubic=True)
    close.positions[1] = close.positions[0] + [1.0, 0.0, 0.0]  # EMT: max |F| ~ 230 eV/Å
    coincident = bulk("Cu", "fcc", a=3.61, cubic=True)
    coincident.positions[1] = coincident.positions[0] + [0.02, 0.0, 0.0]
    flat = bulk("Cu", "fcc", a=3.61, cubic=True)
    flat.cell[2] = flat.cell[0]  # zero volume
    ok = cu_frames(1)[0]
    with caplog.at_level("WARNING", logger="alflow.label"):
        res = label_frames([ok, close, coincident, flat], LabellingConfig(oracle="emt"), tmp_path / "ds",
                           tmp_path / "w", progress=False)
    assert (res.n_labelled, res.n_attempts, len(res.rejected)) == (2, 2, 2) and not res.complete
    reasons = dict(res.rejected)
    assert "frame 2" in reasons[frame_hash(coincident)] and "0.02 Å apart" in reasons[frame_hash(coincident)]
    assert "frame 3" in reasons[frame_hash(flat)] and "flat or zero-volume cell" in reasons[frame_hash(flat)]
    ((h, fmax),) = res.high_force
    assert h == frame_hash(close) and fmax > 100
    assert any(frame_hash(close)[:12] in r.getMessage() and "max |F|" in r.getMessage() for r in caplog.records)
    src = tmp_path / "f.extxyz"
    ase.io.write(src, [close])
    assert main(label_cmd(src, tmp_path / "ds2", "--oracle", "emt", "--max-force-warning", "100")) == 0
    err = capsys.readouterr().err
    assert "1 label(s) with max |F| above 100 eV/Å" in err and frame_hash(close)[:12] in err


def test_the_oracle_key_of_a_label_does_not_depend_on_a_secret():
    from alflow.label import _labelled_frame

    atoms, keys = cu_frames(1)[0], []
    for secret in ("hunter2", "correct horse"):
        cfg = LabellingConfig(oracle="emt", parameters={"password": secret})
        labelled = _labelled_frame(atoms, {"energy": 0.0, "forces": np.zeros((4, 3))}, cfg, cfg.parameters, 0)
        keys.append(labelled.info["oracle_key"])
    assert keys[0] == keys[1]
