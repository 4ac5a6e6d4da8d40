"""Launch and own i-PI runs: write the XML, start server and driver, watch, parse.

One run = one directory. alflow writes ``input.xml`` and ``init.extxyz``, starts
``i-pi`` there as its own process (i-PI's ``softexit`` is a process-wide singleton
that calls ``sys.exit``), waits for the unix socket file before starting the
``alflow ipi-driver`` client, watches both, enforces a wall-clock limit, and on any
failure stops both and reports what happened. Sockets live under a per-run prefix
(see IPI_SOCKET_PREFIX); a stale socket file is removed before the start.

Output parsing returns frames in the same form as the ASE walkers: ``ase.Atoms``
with ``max_force_deviation`` (eV/Å) and ``energy_deviation_per_atom`` (eV/atom),
computed from the committee members' forces and energies i-PI records (already
rescaled by the committee's ``alpha``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io import read, write

from alflow import keys
from alflow.ensembles import for_engine as ensembles_for
from alflow.committee import scores as committee_scores

IPI_ENSEMBLES = ensembles_for("ipi")  # the one ensemble table: alflow.ensembles


@dataclass
class IPIRunSpec:
    """One i-PI simulation. Units: K, GPa, fs."""

    atoms: Atoms
    ensemble: str = "nvt-svr"
    temperature: float = 300.0  # K
    pressure: float | None = None  # GPa (npt-*)
    timestep: float = 1.0  # fs
    steps: int = 100
    stride: int = 10
    nbeads: int = 1  # > 1 for path integrals (ensemble "pimd")
    seed: int = 12345
    alpha: float = 1.0  # committee calibration factor applied by i-PI
    active_threshold: float = 0.0  # eV: energy std above which i-PI writes the structure to "active"
    name: str = "ipi"

    def __post_init__(self) -> None:
        if self.ensemble not in IPI_ENSEMBLES:
            raise ValueError(f"ensemble: i-PI runs support {', '.join(IPI_ENSEMBLES)}, got {self.ensemble!r}")
        if self.ensemble.startswith("npt") and self.pressure is None:
            raise ValueError(f"pressure: required for ensemble {self.ensemble!r} (GPa)")
        if self.ensemble == "pimd" and self.nbeads < 2:
            self.nbeads = 4


@dataclass(frozen=True)
class IPIRunResult:
    name: str
    status: str  # DONE | ERROR | TIMEOUT
    steps: int
    frames: int
    trajectory: str  # scored extxyz, same form as the ASE walkers'
    message: str
    seconds: float


def _dynamics_xml(spec: IPIRunSpec) -> str:
    tau = "<tau units='femtosecond'>100</tau>"
    ts = f"<timestep units='femtosecond'>{spec.timestep}</timestep>"
    if spec.ensemble == "nve":
        return f"<dynamics mode='nve'>{ts}</dynamics>"
    if spec.ensemble in ("nvt-svr", "nvt-langevin"):
        mode = "svr" if spec.ensemble == "nvt-svr" else "langevin"
        return f"<dynamics mode='nvt'>{ts}<thermostat mode='{mode}'>{tau}</thermostat></dynamics>"
    if spec.ensemble == "pimd":
        return f"<dynamics mode='nvt'>{ts}<thermostat mode='pile_l'>{tau}<pile_lambda>0.5</pile_lambda></thermostat></dynamics>"
    baro = "isotropic" if spec.ensemble == "npt-iso" else "flexible"
    return (f"<dynamics mode='npt'>{ts}<barostat mode='{baro}'><tau units='femtosecond'>1000</tau>"
            f"<thermostat mode='langevin'>{tau}</thermostat></barostat>"
            f"<thermostat mode='svr'>{tau}</thermostat></dynamics>")


def write_input(spec: IPIRunSpec, run_dir: Path, address: str, wall_seconds: float) -> Path:
    """Write ``init.extxyz`` and ``input.xml`` for ``spec`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    init = spec.atoms.copy()
    init.calc = None
    write(run_dir / "init.extxyz", init, format="extxyz")
    pressure = f"<pressure units='gigapascal'>{spec.pressure}</pressure>" if spec.ensemble.startswith("npt") else ""
    active = (f"<active_thresh units='electronvolt'>{spec.active_threshold}</active_thresh><active_output>active</active_output>"
              if spec.active_threshold > 0 else "")
    xml = f"""<simulation verbosity='low' safe_stride='{max(spec.stride, 1)}'>
  <output prefix='simulation'>
    <properties stride='{spec.stride}' filename='out'> [ step, time{{picosecond}}, conserved{{electronvolt}}, temperature{{kelvin}}, potential{{electronvolt}}, pressure_md{{gigapascal}}, volume{{angstrom3}} ] </properties>
    <trajectory filename='pos' stride='{spec.stride}' format='ase' cell_units='ase' bead='0'> positions{{ase}} </trajectory>
    <trajectory filename='committee_pot' stride='{spec.stride}' extra_type='committee_pot' bead='0'> extras </trajectory>
    <trajectory filename='committee_force' stride='{spec.stride}' extra_type='committee_force' bead='0'> extras </trajectory>
  </output>
  <total_steps>{spec.steps}</total_steps>
  <total_time>{int(wall_seconds)}</total_time>
  <prng><seed>{spec.seed}</seed></prng>
  <ffcommittee name='committee'>
    <ffsocket name='alflow' mode='unix' pbc='false'><address>{address}</address><latency>1e-4</latency><timeout>{int(wall_seconds)}</timeout></ffsocket>
    <parse_json>true</parse_json>
    <alpha>{spec.alpha}</alpha>
    {active}
  </ffcommittee>
  <system>
    <initialize nbeads='{spec.nbeads}'>
      <file mode='ase'>init.extxyz</file>
      <velocities mode='thermal' units='kelvin'>{spec.temperature}</velocities>
    </initialize>
    <forces><force forcefield='committee'/></forces>
    <motion mode='dynamics'>{_dynamics_xml(spec)}</motion>
    <ensemble><temperature units='kelvin'>{spec.temperature}</temperature>{pressure}</ensemble>
  </system>
</simulation>
"""
    path = run_dir / "input.xml"
    path.write_text(xml)
    return path


# i-PI 3.3 applies ``-S``/``sockets_prefix`` only to top-level <ffsocket>s, not to the one
# nested in <ffcommittee> (inputs/simulation.py), so the committee socket always lives at
# /tmp/ipi_<address>: alflow gives every run a unique address and removes the file itself.
IPI_SOCKET_PREFIX = "/tmp/ipi_"


def _stop(process: subprocess.Popen | None, grace: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def run_ipi(spec: IPIRunSpec, model_path: str | Path, run_dir: str | Path, *, wall_seconds: float = 600.0,
            device: str = "auto", start_timeout: float = 60.0) -> IPIRunResult:
    """Run one i-PI simulation with the committee in ``model_path``; never hangs past ``wall_seconds``."""
    run_dir = Path(run_dir)
    start = time.monotonic()
    address = f"alflow-{uuid.uuid4().hex[:8]}"
    prefix = IPI_SOCKET_PREFIX
    socket_file = Path(prefix + address)
    socket_file.unlink(missing_ok=True)  # a stale socket from a killed run blocks the server
    write_input(spec, run_dir, address, wall_seconds)
    ipi_exe = shutil.which("i-pi") or str(Path(sys.executable).parent / "i-pi")
    server = driver = None
    status, message = "ERROR", ""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(run_dir / "ipi.log", "w") as server_log, open(run_dir / "driver.log", "w") as driver_log:
            server = subprocess.Popen([ipi_exe, "input.xml"], cwd=run_dir, stdout=server_log,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True)
            while not socket_file.exists():  # a client started before the socket exists gets FileNotFoundError
                if server.poll() is not None:
                    raise RuntimeError(f"i-PI exited with code {server.returncode} before opening its socket:\n{_tail(run_dir / 'ipi.log')}")
                if time.monotonic() - start > start_timeout:
                    raise TimeoutError(f"i-PI did not open {socket_file} within {start_timeout:.0f} s")
                time.sleep(0.05)
            driver = subprocess.Popen(
                [sys.executable, "-m", "alflow.cli", "ipi-driver", "--model", str(Path(model_path).resolve()),
                 "--structure", "init.extxyz", "--unix", address, "--prefix", prefix, "--device", device],
                cwd=run_dir, stdout=driver_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            deadline = start + wall_seconds + 30.0
            while server.poll() is None:
                if driver.poll() is not None and driver.returncode != 0:
                    raise RuntimeError(f"driver exited with code {driver.returncode}:\n{_tail(run_dir / 'driver.log')}")
                if time.monotonic() > deadline:
                    status = "TIMEOUT"
                    raise TimeoutError(f"i-PI still running after {wall_seconds:.0f} s: stopped")
                time.sleep(0.1)
            if server.returncode != 0:
                raise RuntimeError(f"i-PI exited with code {server.returncode}:\n{_tail(run_dir / 'ipi.log')}")
            try:
                driver.wait(10.0)
            except subprocess.TimeoutExpired:
                pass
            status = "DONE"
    except (RuntimeError, TimeoutError, OSError) as exc:
        message = str(exc)
    finally:
        _stop(driver)
        _stop(server)
        socket_file.unlink(missing_ok=True)
    frames = parse_run(run_dir, spec) if status != "ERROR" or (run_dir / "simulation.pos_0.extxyz").exists() else []
    trajectory = run_dir / f"{spec.name}.extxyz"
    trajectory.unlink(missing_ok=True)
    if frames:
        write(trajectory, frames, format="extxyz")
    steps = int(frames[-1].info[keys.STEP]) if frames else 0
    result = IPIRunResult(spec.name, status, steps, len(frames), str(trajectory), message, time.monotonic() - start)
    (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


# ----------------------------------------------------------------------------- parsing

_HEADER = re.compile(r"#EXTRAS\((?P<kind>[^)]*)\)#\s*Step:\s*(?P<step>\d+)")


def read_extras(path: str | Path) -> list[tuple[int, np.ndarray]]:
    """(step, rows) blocks of an i-PI ``extras`` trajectory with a numeric ``extra_type``."""
    blocks: list[tuple[int, list[list[float]]]] = []
    for line in Path(path).read_text().splitlines():
        match = _HEADER.search(line)
        if match:
            blocks.append((int(match["step"]), []))
        elif line.strip() and blocks:
            blocks[-1][1].append([float(x) for x in line.split()])
    return [(step, np.array(rows)) for step, rows in blocks]


def read_active(path: str | Path) -> list[dict[str, Any]]:
    """i-PI's active-learning output: JSON records written back to back with no separator."""
    text = Path(path).read_text() if Path(path).exists() else ""
    decoder, records, index = json.JSONDecoder(), [], 0
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            return records
        record, index = decoder.raw_decode(text, index)
        records.append(record)


def parse_run(run_dir: str | Path, spec: IPIRunSpec) -> list[Atoms]:
    """Scored frames (Å, eV/Å) from an i-PI run directory, one per ``stride`` steps."""
    run_dir = Path(run_dir)
    positions = read(run_dir / "simulation.pos_0.extxyz", ":") if (run_dir / "simulation.pos_0.extxyz").exists() else []
    pots = read_extras(run_dir / "simulation.committee_pot_0") if (run_dir / "simulation.committee_pot_0").exists() else []
    forces = read_extras(run_dir / "simulation.committee_force_0") if (run_dir / "simulation.committee_force_0").exists() else []
    frames = []
    for frame, (step, pot), (_, force) in zip(positions, pots, forces):
        n = len(frame)
        energies = pot.reshape(-1) * units.Hartree
        forces_comm = force.reshape(len(energies), n, 3) * units.Hartree / units.Bohr
        s = committee_scores(forces_comm, energies, n_atoms=n)
        out = Atoms(numbers=spec.atoms.numbers, positions=frame.positions, cell=frame.cell, pbc=spec.atoms.pbc)
        out.info.update({
            keys.MAX_FORCE_DEVIATION: float(s[keys.MAX_FORCE_DEVIATION]),
            keys.ENERGY_DEVIATION_PER_ATOM: float(s[keys.ENERGY_DEVIATION_PER_ATOM]),
            keys.PRED_ENERGY: float(energies.mean()),
            keys.STEP: step,
            keys.WALKER: spec.name,
            keys.SOURCE: "ipi",
            "temperature_K": spec.temperature,
        })
        out.arrays[keys.PRED_FORCES] = forces_comm.mean(axis=0)
        out.arrays[keys.FORCE_DEVIATION] = np.asarray(s["force_deviation"])
        frames.append(out)
    return frames
