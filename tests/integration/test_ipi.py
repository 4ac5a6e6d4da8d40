"""Against the real i-PI server from the ``ipi`` package: driver protocol, units, lifecycle."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.io import read

import potentials
from alflow import keys
from alflow.explore.evaluator import ModelEvaluator
from alflow.explore.ipi_driver import IPIDriver, StopRules, Target, _Channel
from alflow.explore.ipi import (
    IPI_SOCKET_PREFIX, IPIRunSpec, parse_run, read_active, read_extras, run_ipi, run_ipi_walkers, write_input,
)
from potentials.committee import Committee

pytestmark = pytest.mark.slow  # each test starts an i-PI server (a few seconds of imports)


@pytest.fixture(scope="module")
def committee_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                            n_interactions=2, n_rbf=10)
    model.double()
    for member in model.members:
        member.scale.fill_(0.05)
    path = tmp_path_factory.mktemp("model") / "committee.pt"
    potentials.save(model, path)
    return path


def triclinic_cu():
    atoms = bulk("Cu", "fcc", a=3.61).repeat((3, 3, 3))  # primitive fcc cell: i-PI must rotate it
    atoms.rattle(0.05, seed=2)
    return atoms


def test_served_energies_and_forces_equal_the_ase_calculator(tmp_path, committee_file):
    spec = IPIRunSpec(atoms=triclinic_cu(), ensemble="nvt-svr", steps=6, stride=2, name="eq")
    result = run_ipi(spec, committee_file, tmp_path, wall_seconds=120)
    assert result.status == "DONE", result.message
    model = potentials.load(committee_file, device="cpu")
    evaluate = ModelEvaluator(model, device="cpu")
    pots = read_extras(tmp_path / "simulation.committee_pot_0")
    forces = read_extras(tmp_path / "simulation.committee_force_0")
    frames = read(tmp_path / "simulation.pos_0.extxyz", ":")
    assert len(frames) == len(pots) == len(forces) == 4
    for frame, (_, pot), (_, force) in zip(frames, pots, forces):
        frame.pbc = True
        [ref] = evaluate([frame])  # positions in i-PI's rotated frame: forces must match in that frame
        energies = pot.reshape(-1) * units.Hartree
        members = force.reshape(3, len(frame), 3) * units.Hartree / units.Bohr
        np.testing.assert_allclose(energies, ref["energies"], rtol=1e-6)
        np.testing.assert_allclose(members, ref["forces_comm"], rtol=1e-6, atol=1e-8)
    scored = read(result.trajectory, ":")
    assert all(f.info[keys.SOURCE] == "ipi" for f in scored)
    assert scored[-1].info[keys.MAX_FORCE_DEVIATION] > 0


def test_nve_conserves_energy_and_pimd_runs(tmp_path, committee_file):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    nve = run_ipi(IPIRunSpec(atoms=atoms, ensemble="nve", steps=100, stride=10, timestep=1.0, name="nve"),
                  committee_file, tmp_path / "nve", wall_seconds=240)
    assert nve.status == "DONE", nve.message
    out = np.loadtxt(tmp_path / "nve" / "simulation.out")
    time_ps, conserved = out[:, 1], out[:, 2]
    drift = abs(np.polyfit(time_ps, conserved, 1)[0]) / len(atoms)
    assert drift < 1e-2, f"NVE drift {drift:.2e} eV/atom/ps"
    pimd = run_ipi(IPIRunSpec(atoms=atoms, ensemble="pimd", nbeads=4, steps=10, stride=5, timestep=0.5, name="pimd"),
                   committee_file, tmp_path / "pimd", wall_seconds=240)
    assert pimd.status == "DONE", pimd.message
    assert pimd.frames == 3 and "nbeads='4'" in (tmp_path / "pimd" / "input.xml").read_text()


def test_active_output_and_stale_socket(tmp_path, committee_file):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=0)
    spec = IPIRunSpec(atoms=atoms, ensemble="nvt-langevin", steps=4, stride=2, active_threshold=1e-9, name="act")
    result = run_ipi(spec, committee_file, tmp_path, wall_seconds=120)
    assert result.status == "DONE", result.message
    records = read_active(tmp_path / "simulation.active")
    assert len(records) >= 4 and {"position", "cell", "uncertainty"} <= set(records[0])
    assert len(records[0]["position"]) == 3 * len(atoms)
    assert not list(tmp_path.glob("ipi_*"))  # no socket left behind
    assert len(parse_run(tmp_path, spec)) == 3


def test_driver_exits_cleanly_when_the_server_vanishes(tmp_path, committee_file):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    address = f"alflow-test-{os.getpid()}"
    spec = IPIRunSpec(atoms=atoms, ensemble="nvt-svr", steps=100000, stride=1000, name="gone")
    write_input(spec, tmp_path, address, wall_seconds=300)
    ipi_exe = os.path.join(os.path.dirname(sys.executable), "i-pi")
    server = subprocess.Popen([ipi_exe, "input.xml"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = subprocess.Popen([sys.executable, "-m", "alflow.cli", "ipi-driver", "--model", str(committee_file),
                               "--structure", "init.extxyz", "--unix", address], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "simulation.out").exists() or (tmp_path / "simulation.out").stat().st_size < 300:
            assert time.monotonic() < deadline, "i-PI never produced output"
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        server.send_signal(signal.SIGKILL)  # vanishes without EXIT
        server.wait()
        _, err = driver.communicate(timeout=30)  # must not hang or spin
        assert driver.returncode == 1
        assert "server gone" in err
    finally:
        for p in (server, driver):
            if p.poll() is None:
                p.kill()
        if os.path.exists(IPI_SOCKET_PREFIX + address):
            os.unlink(IPI_SOCKET_PREFIX + address)


def test_driver_reports_missing_server(tmp_path, committee_file):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.write(tmp_path / "init.extxyz")
    proc = subprocess.run([sys.executable, "-m", "alflow.cli", "ipi-driver", "--model", str(committee_file),
                           "--structure", str(tmp_path / "init.extxyz"), "--unix", "nobody-here", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no i-PI server" in proc.stderr


def test_walkers_run_concurrently_served_in_batches_by_one_driver(tmp_path, committee_file):
    """Three i-PI servers at once, one driver: a classical walker with a temperature ramp and friction, a
    2-bead ring polymer (two connections) and an NPT walker with a pressure ramp. The driver evaluates their
    requests together."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    ramp = IPIRunSpec(atoms=atoms, ensemble="nvt-langevin", temperature=[300.0, 600.0], friction=0.02, steps=8,
                      stride=4, name="ramp")
    pimd = IPIRunSpec(atoms=atoms, ensemble="pimd", nbeads=2, temperature=100.0, steps=8, stride=4, timestep=0.5,
                      name="pimd")
    npt = IPIRunSpec(atoms=atoms, ensemble="npt-iso", pressure=[0.0, 1.0], steps=8, stride=4, name="npt")
    results = run_ipi_walkers([ramp, pimd, npt], committee_file, tmp_path, wall_seconds=240)
    assert [r.status for r in results] == ["DONE"] * 3, [r.message for r in results]
    assert [r.steps for r in results] == [8, 8, 8]
    assert "<p_ramp>" in (tmp_path / "npt" / "input.xml").read_text()
    log = (tmp_path / "driver.log").read_text()
    served = re.search(r"(\d+) evaluations in (\d+) committee calls, \d+ of them with the committee spread "
                       r"\(3 server\(s\), 4 connection\(s\)\)", log)
    assert served, log
    evaluations, calls = int(served[1]), int(served[2])
    assert evaluations == 9 + 2 * 9 + 9  # steps 0..8: one evaluation per step and bead
    assert calls < evaluations  # requests of different servers and beads shared committee calls
    xml = (tmp_path / "ramp" / "input.xml").read_text()
    assert "<t_ramp>" in xml and "<tau units='femtosecond'>50</tau>" in xml  # friction 0.02/fs: tau = 50 fs
    out = np.loadtxt(tmp_path / "ramp" / "simulation.out")
    assert out[0, -1] == pytest.approx(300.0) and out[-1, -1] == pytest.approx(600.0)  # i-PI's target temperature
    frames = read(results[0].trajectory, ":")
    assert [f.info["temperature_K"] for f in frames] == [300.0, 450.0, 600.0]


def test_a_vanished_server_ends_only_its_own_walker(tmp_path, committee_file):
    """One driver, two servers; one is killed: the other runs to its end and the driver exits 1 (one gone)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    ipi_exe = os.path.join(os.path.dirname(sys.executable), "i-pi")
    servers, addresses = [], []
    for name, steps in (("long", 100000), ("short", 30)):
        address = f"alflow-test-{name}-{os.getpid()}"
        write_input(IPIRunSpec(atoms=atoms, ensemble="nvt-svr", steps=steps, stride=10, name=name), tmp_path / name,
                    address, wall_seconds=300)
        servers.append(subprocess.Popen([ipi_exe, "input.xml"], cwd=tmp_path / name, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        addresses.append(address)
    args = [sys.executable, "-m", "alflow.cli", "ipi-driver", "--model", str(committee_file),
            "--structure", str(tmp_path / "long" / "init.extxyz")]
    for address in addresses:
        args += ["--unix", address]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "long" / "simulation.out").exists() or (tmp_path / "long" / "simulation.out").stat().st_size < 300:
            assert time.monotonic() < deadline, "i-PI never produced output"
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        servers[0].send_signal(signal.SIGKILL)
        servers[0].wait()
        assert servers[1].wait(timeout=120) == 0  # the other walker finishes its 30 steps
        _, err = driver.communicate(timeout=60)
        assert driver.returncode == 1 and "server gone" in err
        assert np.loadtxt(tmp_path / "short" / "simulation.out")[-1, 0] == 30
    finally:
        for p in (*servers, driver):
            if p.poll() is None:
                p.kill()
        for address in addresses:
            if os.path.exists(IPI_SOCKET_PREFIX + address):
                os.unlink(IPI_SOCKET_PREFIX + address)


def test_a_structure_the_model_fails_on_stops_only_its_walker(tmp_path, committee_file):
    """One held structure with a NaN coordinate in a gathered batch: its walker is stopped (ERROR, EXIT file),
    the other walker gets its forces from the same gathered call."""
    good = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    good.rattle(0.05, seed=4)
    bad = good.copy()
    bad.positions[3] = np.nan
    targets = [Target(template=good, run_dir=tmp_path / "good", name="good"),
               Target(template=bad, run_dir=tmp_path / "bad", name="bad")]
    for t in targets:
        t.run_dir.mkdir()
    driver = IPIDriver(potentials.load(committee_file, device="cpu"), targets, device="cpu",
                       rules=StopRules(min_distance=0.5))
    sockets = [socket.socketpair() for _ in targets]
    try:
        driver.channels = [_Channel(a, t) for (a, _), t in zip(sockets, targets)]
        for channel, atoms in zip(driver.channels, (good, bad)):
            channel.pending = (atoms.cell.array, atoms.positions)
        driver._evaluate_pending()
        [ref] = ModelEvaluator(potentials.load(committee_file, device="cpu"), device="cpu")([good])
        energy, forces, _, _ = driver.channels[0].result
        np.testing.assert_allclose(forces * units.Hartree / units.Bohr, ref["forces"], rtol=1e-10, atol=1e-12)
        assert not (tmp_path / "good" / "stop.json").exists() and not (tmp_path / "good" / "EXIT").exists()
        verdict = json.loads((tmp_path / "bad" / "stop.json").read_text())
        assert verdict["status"] == "ERROR" and "NaN" in verdict["message"]
        assert (tmp_path / "bad" / "EXIT").exists() and driver.channels[1].status == "HAVEDATA"
    finally:
        for pair in sockets:
            for s in pair:
                s.close()
