"""Launch and own i-PI runs: write the XML, start servers and one driver, watch, parse.

One walker = one directory and one i-PI server. alflow writes ``input.xml`` and
``init.extxyz``, starts ``i-pi`` there as its own process (i-PI's ``softexit`` is a
process-wide singleton that calls ``sys.exit``), waits for the unix socket files,
then starts ONE ``alflow ipi-driver`` client that serves every walker's server at
once (their requests are evaluated in one committee call per step; path integrals
get one connection per bead). :func:`run_ipi_walkers` runs the walkers concurrently,
watches every process, enforces a wall-clock limit, and reports each walker's fate
on its own (a server that fails ends only its walker). Sockets live under a per-run
prefix (see IPI_SOCKET_PREFIX); a stale socket file is removed before the start.

What i-PI honours of a walker: temperature and pressure as a value or a linear ramp
between two set points (i-PI's ``t_ramp``/``p_ramp`` motions, combined with the
dynamics in a ``multi`` motion; longer ramps are rejected), ``friction`` as the
Langevin thermostat's time constant tau = 1/friction, the committee's calibration α
(i-PI rescales the members around their mean by α, as alflow's scores do), and the
ASE engine's stop rules, applied on the fly by the driver (see ``ipi_driver``).

Output parsing returns frames in the same form as the ASE walkers: ``ase.Atoms``
with ``max_force_deviation`` (eV/Å) and ``energy_deviation_per_atom`` (eV/atom),
computed from the committee members' forces and energies i-PI records (already
rescaled by α).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io import read, write

from alflow import keys
from alflow.ensembles import for_engine as ensembles_for
from alflow.committee import scores as committee_scores
from alflow.errors import InputError
from alflow.explore.ase_md import ramp
from alflow.explore.frames import DONE, ERROR, TEMPERATURE_K, WalkerResult, scored_frame
from alflow.explore.ipi_driver import StopRules
from alflow.process import python_module

IPI_ENSEMBLES = ensembles_for("ipi")  # the one ensemble table: alflow.ensembles


IPIRunResult = WalkerResult  # one result type for every engine (name, status, steps, frames, trajectory, ...)


def _set_points(value: float | Sequence[float] | None, name: str) -> list[float]:
    """A value or ramp as its list of set points; i-PI ramps linearly between two at most."""
    if value is None:
        return []
    points = [float(v) for v in np.ravel(value)]
    if not 1 <= len(points) <= 2:
        raise InputError(f"{name}: the i-PI engine ramps linearly between two set points at most (i-PI's "
                         f"t_ramp/p_ramp), got {len(points)}; use engine 'ase' or split the walker")
    return points


@dataclass
class IPIRunSpec:
    """One i-PI simulation. Units: K, GPa, fs, 1/fs."""

    atoms: Atoms
    ensemble: str = "nvt-svr"
    temperature: float | Sequence[float] = 300.0  # K; [start, end] is a linear ramp over the run
    pressure: float | Sequence[float] | None = None  # GPa (npt-*); [start, end] is a linear ramp
    timestep: float = 1.0  # fs
    steps: int = 100
    stride: int = 10
    nbeads: int = 1  # > 1 for path integrals (ensemble "pimd")
    friction: float = 0.01  # 1/fs: the Langevin thermostat (nvt-langevin) has tau = 1/friction
    seed: int = 12345
    alpha: float = 1.0  # committee calibration factor applied by i-PI (pass the committee's)
    active_threshold: float = 0.0  # eV: energy std above which i-PI writes the structure to "active"
    name: str = "ipi"

    def __post_init__(self) -> None:
        if self.ensemble not in IPI_ENSEMBLES:
            raise InputError(f"ensemble: i-PI runs support {', '.join(IPI_ENSEMBLES)}, got {self.ensemble!r}")
        if self.ensemble.startswith("npt") and self.pressure is None:
            raise InputError(f"pressure: required for ensemble {self.ensemble!r} (GPa)")
        _set_points(self.temperature, "temperature")
        _set_points(self.pressure, "pressure")
        if not (self.friction > 0 and np.isfinite(self.friction)):
            raise InputError(f"friction: expected a positive finite rate (1/fs), got {self.friction!r}")
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha: expected a positive finite calibration factor, got {self.alpha!r}")
        if self.ensemble == "pimd" and self.nbeads < 2:
            self.nbeads = 4
        if self.ensemble != "pimd":
            self.nbeads = 1

    def temperature_at(self, step: int) -> float:
        """The target temperature (K) at ``step``, as the ASE engine's ramp."""
        return ramp(self.temperature, step / self.steps)


def load_alpha(model_path: str | Path) -> float:
    """The calibration factor α stored with a committee file (1.0 for a single model), read from the
    checkpoint without building the model (as ``Committee.from_checkpoint``: the ``alpha`` buffer wins)."""
    from potentials.registry import read_checkpoint

    payload = read_checkpoint(model_path)
    if payload.get("kind") not in ("committee", "shallow"):  # a shallow committee stores α the same way
        return 1.0
    alpha = payload["state_dict"].get("alpha", payload["metadata"].get("alpha", 1.0))
    return float(alpha)


def _dynamics_xml(spec: IPIRunSpec) -> str:
    """i-PI's <dynamics>; time constants as the ASE engine's: thermostats 100 dt, barostat 1000 dt,
    Langevin tau = 1/friction."""
    dt = spec.timestep
    tau = f"<tau units='femtosecond'>{100 * dt:g}</tau>"
    ts = f"<timestep units='femtosecond'>{dt}</timestep>"
    if spec.ensemble == "nve":
        return f"<dynamics mode='nve'>{ts}</dynamics>"
    if spec.ensemble == "nvt-svr":
        return f"<dynamics mode='nvt'>{ts}<thermostat mode='svr'>{tau}</thermostat></dynamics>"
    if spec.ensemble == "nvt-langevin":
        langevin = f"<tau units='femtosecond'>{1.0 / spec.friction:g}</tau>"
        return f"<dynamics mode='nvt'>{ts}<thermostat mode='langevin'>{langevin}</thermostat></dynamics>"
    if spec.ensemble == "pimd":
        return f"<dynamics mode='nvt'>{ts}<thermostat mode='pile_l'>{tau}<pile_lambda>0.5</pile_lambda></thermostat></dynamics>"
    baro = "isotropic" if spec.ensemble == "npt-iso" else "flexible"
    return (f"<dynamics mode='npt'>{ts}<barostat mode='{baro}'><tau units='femtosecond'>{1000 * dt:g}</tau>"
            f"<thermostat mode='langevin'>{tau}</thermostat></barostat>"
            f"<thermostat mode='svr'>{tau}</thermostat></dynamics>")


def _motion_xml(spec: IPIRunSpec) -> str:
    """The dynamics, preceded by linear temperature/pressure ramps when set (a ``multi`` motion)."""
    dynamics = f"<motion mode='dynamics'>{_dynamics_xml(spec)}</motion>"
    ramps = []
    temperatures = _set_points(spec.temperature, "temperature")
    if len(temperatures) == 2:
        ramps.append(f"<motion mode='t_ramp'><t_ramp><t_start units='kelvin'>{temperatures[0]}</t_start>"
                     f"<t_end units='kelvin'>{temperatures[1]}</t_end><total_steps>{spec.steps}</total_steps>"
                     f"<logscale>false</logscale></t_ramp></motion>")
    pressures = _set_points(spec.pressure, "pressure") if spec.ensemble.startswith("npt") else []
    if len(pressures) == 2:
        ramps.append(f"<motion mode='p_ramp'><p_ramp><p_start units='gigapascal'>{pressures[0]}</p_start>"
                     f"<p_end units='gigapascal'>{pressures[1]}</p_end><total_steps>{spec.steps}</total_steps>"
                     f"<logscale>false</logscale></p_ramp></motion>")
    if not ramps:
        return dynamics
    return f"<motion mode='multi'>{''.join(ramps)}{dynamics}</motion>"


def write_input(spec: IPIRunSpec, run_dir: Path, address: str, wall_seconds: float) -> Path:
    """Write ``init.extxyz`` and ``input.xml`` for ``spec`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    init = spec.atoms.copy()
    init.calc = None
    write(run_dir / "init.extxyz", init, format="extxyz")
    t0 = _set_points(spec.temperature, "temperature")[0]
    pressure = (f"<pressure units='gigapascal'>{_set_points(spec.pressure, 'pressure')[0]}</pressure>"
                if spec.ensemble.startswith("npt") else "")
    active = (f"<active_thresh units='electronvolt'>{spec.active_threshold}</active_thresh><active_output>active</active_output>"
              if spec.active_threshold > 0 else "")
    xml = f"""<simulation verbosity='low' safe_stride='{max(spec.stride, 1)}'>
  <output prefix='simulation'>
    <properties stride='{spec.stride}' filename='out'> [ step, time{{picosecond}}, conserved{{electronvolt}}, temperature{{kelvin}}, potential{{electronvolt}}, pressure_md{{gigapascal}}, volume{{angstrom3}}, ensemble_temperature{{kelvin}} ] </properties>
    <trajectory filename='pos' stride='{spec.stride}' format='ase' cell_units='ase' bead='0'> positions{{ase}} </trajectory>
    <trajectory filename='mom' stride='{spec.stride}' format='ase' cell_units='ase' bead='0'> momenta{{ase}} </trajectory>
    <trajectory filename='committee_pot' stride='{spec.stride}' extra_type='committee_pot' bead='0'> extras </trajectory>
    <trajectory filename='committee_force' stride='{spec.stride}' extra_type='committee_force' bead='0'> extras </trajectory>
    <trajectory filename='force_deviation' stride='{spec.stride}' extra_type='committee_force_deviation' bead='0'> extras </trajectory>
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
      <velocities mode='thermal' units='kelvin'>{t0}</velocities>
    </initialize>
    <forces><force forcefield='committee'/></forces>
    {_motion_xml(spec)}
    <ensemble><temperature units='kelvin'>{t0}</temperature>{pressure}</ensemble>
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


CHILDREN = "ipi-children.json"  # pidfile of the i-PI servers and the driver (alflow.process.reap)


def _stop(process: subprocess.Popen | None, grace: float = 5.0, pidfile: Path | None = None) -> None:
    """SIGTERM, then SIGKILL of the whole process tree after ``grace`` s (alflow.process.stop)."""
    from alflow.process import stop

    stop(process, grace, pidfile=pidfile)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


@dataclass
class _Walker:
    """One walker's server while it runs."""

    spec: IPIRunSpec
    run_dir: Path
    address: str
    socket_file: Path
    server: subprocess.Popen | None = None
    status: str | None = None  # None while running; DONE, ERROR or TIMEOUT
    message: str = ""


def _start_server(ipi_exe: str, run_dir: Path, log: Any, env: dict[str, str], pidfile: Path) -> subprocess.Popen:
    """i-PI in its own session, killed by the kernel when this process dies (alflow.process.start)."""
    from alflow.process import start

    return start([ipi_exe, "input.xml"], cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env, pidfile=pidfile)


def _start_driver(args: list[str], cwd: Path, log: Any, env: dict[str, str], pidfile: Path) -> subprocess.Popen:
    """The driver, like the servers: own session, dies with this process, recorded in ``pidfile``."""
    from alflow.process import start

    return start(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, pidfile=pidfile)


def run_ipi_walkers(specs: Sequence[IPIRunSpec], model_path: str | Path, out_dir: str | Path, *,
                    rules: StopRules | None = None, wall_seconds: float = 600.0, device: str = "auto",
                    start_timeout: float = 60.0, gather_s: float = 0.05,
                    run_dirs: Sequence[str | Path] | None = None, spread_stride: int | None = None) -> list[WalkerResult]:
    """Run every walker concurrently, each in its own i-PI server, all served by one driver process.

    Walker ``spec.name`` runs in ``out_dir/name`` (or ``run_dirs[i]``); one result per walker,
    in order; a walker's failure (its server exits with an error, never opens its socket) is its
    own. The whole run never outlives ``wall_seconds`` (+30 s grace): what still runs is TIMEOUT.
    ``driver.log`` is written in ``out_dir``. ``spread_stride``: MD steps between the driver's committee
    spreads (``alflow ipi-driver --spread-stride``); None: each walker's ``stride``, where i-PI records them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"walker names must be unique, got {names}")
    rules = rules or StopRules()
    dirs = [Path(d) for d in run_dirs] if run_dirs is not None else [out_dir / n for n in names]
    start = time.monotonic()
    prefix = IPI_SOCKET_PREFIX
    ipi_exe = shutil.which("i-pi") or str(Path(sys.executable).parent / "i-pi")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    walkers = [_Walker(spec, run_dir, "", Path()) for spec, run_dir in zip(specs, dirs)]
    logs: list[Any] = []
    driver = None
    from alflow.process import reap

    pidfile = out_dir / CHILDREN
    reap(pidfile)  # servers and a driver a killed run left behind (the parent-death signal missed them)
    try:
        for w in walkers:
            w.address = f"alflow-{uuid.uuid4().hex[:8]}"
            w.socket_file = Path(prefix + w.address)
            w.socket_file.unlink(missing_ok=True)  # a stale socket from a killed run blocks the server
            w.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("EXIT", "stop.json", "stop.extxyz"):  # a previous run's soft exit would stop this one
                (w.run_dir / stale).unlink(missing_ok=True)
            write_input(w.spec, w.run_dir, w.address, wall_seconds)
            logs.append(open(w.run_dir / "ipi.log", "w"))
            w.server = _start_server(ipi_exe, w.run_dir, logs[-1], env, pidfile)
        for w in walkers:  # a client started before the socket exists gets FileNotFoundError
            while w.status is None and not w.socket_file.exists():
                if w.server.poll() is not None:
                    w.status = ERROR
                    w.message = (f"i-PI exited with code {w.server.returncode} before opening its socket:\n"
                                 f"{_tail(w.run_dir / 'ipi.log')}")
                elif time.monotonic() - start > start_timeout:
                    w.status, w.message = ERROR, f"i-PI did not open {w.socket_file} within {start_timeout:.0f} s"
                    _stop(w.server, pidfile=pidfile)
                else:
                    time.sleep(0.05)
        serving = [w for w in walkers if w.status is None]
        if serving:
            args = [*python_module("alflow.cli", "ipi-driver"), "--model", str(Path(model_path).resolve()),
                    "--prefix", prefix, "--device", device, "--upper", repr(float(rules.upper)),
                    "--patience", str(int(rules.patience)), "--min-distance", repr(float(rules.min_distance)),
                    "--gather", repr(float(gather_s))]
            for w in serving:
                args += ["--unix", w.address, "--structure", str((w.run_dir / "init.extxyz").resolve()),
                         "--connections", str(w.spec.nbeads), "--run-dir", str(w.run_dir.resolve()),
                         "--spread-stride", str(max(1, w.spec.stride if spread_stride is None else spread_stride))]
            logs.append(open(out_dir / "driver.log", "w"))
            driver = _start_driver(args, out_dir, logs[-1], env, pidfile)
            deadline = start + wall_seconds + 30.0
            while True:
                running = [w for w in serving if w.status is None and w.server.poll() is None]
                if not running:
                    break
                if driver.poll() is not None and driver.returncode != 0:
                    for w in running:
                        w.status = ERROR
                        w.message = f"driver exited with code {driver.returncode}:\n{_tail(out_dir / 'driver.log')}"
                    break
                if time.monotonic() > deadline:
                    for w in running:
                        w.status, w.message = "TIMEOUT", f"i-PI still running after {wall_seconds:.0f} s: stopped"
                    break
                time.sleep(0.1)
            for w in serving:
                if w.status is None:
                    code = w.server.poll()
                    if code == 0:
                        w.status = DONE
                    else:
                        w.status = ERROR
                        w.message = f"i-PI exited with code {code}:\n{_tail(w.run_dir / 'ipi.log')}"
            try:
                driver.wait(10.0)
            except subprocess.TimeoutExpired:
                pass
    except OSError as exc:
        for w in walkers:
            if w.status is None:
                w.status, w.message = ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        _stop(driver, pidfile=pidfile)
        for w in walkers:
            _stop(w.server, pidfile=pidfile)
            if w.address:
                w.socket_file.unlink(missing_ok=True)
        for log in logs:
            log.close()
    seconds = time.monotonic() - start
    return [_walker_result(w, seconds) for w in walkers]


def _walker_result(w: _Walker, seconds: float) -> WalkerResult:
    """Parse a finished walker's directory into its scored trajectory and :class:`WalkerResult`."""
    status, message = w.status or ERROR, w.message
    stop = w.run_dir / "stop.json"
    (w.run_dir / "EXIT").unlink(missing_ok=True)  # the soft-exit request is spent: i-PI could not be rerun here
    if stop.exists() and status == DONE:  # a stop rule fired: i-PI exited cleanly on the driver's request
        verdict = json.loads(stop.read_text())
        status, message = verdict["status"], verdict["message"]
    has_output = (w.run_dir / "simulation.pos_0.extxyz").exists()
    frames = parse_run(w.run_dir, w.spec) if (status != ERROR or has_output) and w.run_dir.exists() else []
    trajectory = w.run_dir / f"{w.spec.name}.extxyz"
    trajectory.unlink(missing_ok=True)
    if frames:
        write(trajectory, frames, format="extxyz")
    steps = int(frames[-1].info[keys.STEP]) if frames else 0
    worst = max((float(f.info[keys.MAX_FORCE_DEVIATION]) for f in frames
                 if np.isfinite(f.info[keys.MAX_FORCE_DEVIATION])), default=0.0)
    result = WalkerResult(w.spec.name, status, steps, len(frames), str(trajectory), worst, message, seconds)
    if w.run_dir.exists():
        (w.run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def run_ipi(spec: IPIRunSpec, model_path: str | Path, run_dir: str | Path, *, wall_seconds: float = 600.0,
            device: str = "auto", start_timeout: float = 60.0, rules: StopRules | None = None) -> WalkerResult:
    """Run one i-PI simulation in ``run_dir`` with the committee in ``model_path``; never hangs past ``wall_seconds``."""
    run_dir = Path(run_dir)
    [result] = run_ipi_walkers([spec], model_path, run_dir, rules=rules, wall_seconds=wall_seconds, device=device,
                               start_timeout=start_timeout, run_dirs=[run_dir])
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
    """Scored frames (Å, eV/Å) from an i-PI run directory, one per ``stride`` steps, in the ASE
    walkers' format (:func:`alflow.explore.frames.scored_frame`, ``source`` = "ipi", ``committee_alpha`` = α).

    When the driver stopped the walker (``stop.json``), its scored stopping frame
    (``stop.extxyz``) ends the trajectory, as the ASE engine's last frame does.
    """
    run_dir = Path(run_dir)
    positions = read(run_dir / "simulation.pos_0.extxyz", ":") if (run_dir / "simulation.pos_0.extxyz").exists() else []
    pots = read_extras(run_dir / "simulation.committee_pot_0") if (run_dir / "simulation.committee_pot_0").exists() else []
    forces = read_extras(run_dir / "simulation.committee_force_0") if (run_dir / "simulation.committee_force_0").exists() else []
    momenta = read(run_dir / "simulation.mom_0.extxyz", ":") if (run_dir / "simulation.mom_0.extxyz").exists() else []
    deviation_file = run_dir / "simulation.force_deviation_0"  # the driver's own scores (since round two)
    deviations = {int(step): rows.reshape(-1) for step, rows in read_extras(deviation_file)} if deviation_file.exists() else {}
    momenta_at = {int(step): m.arrays.get("momenta", m.positions) for (step, _), m in zip(pots, momenta)}  # ASE units
    frames = []
    for frame, (step, pot), (_, force) in zip(positions, pots, forces):
        n = len(frame)
        energies = pot.reshape(-1) * units.Hartree
        forces_comm = force.reshape(len(energies), n, 3) * units.Hartree / units.Bohr
        s = committee_scores(forces_comm, energies, n_atoms=n)
        eps = deviations.get(int(step))
        if eps is not None and eps.shape == (n,) and np.isfinite(eps).all():
            # the model's calibrated per-atom score: equal to the members' force spread for a full committee or
            # a shallow one with per-head forces, and the only one for a shallow committee in ``mean`` mode
            s.update(force_deviation=eps, max_force_deviation=float(eps.max()) if n else 0.0)
            if not np.ptp(forces_comm, axis=0).any():  # identical member forces: no per-component spread
                s[keys.FORCES_VAR] = np.repeat(eps[:, None] ** 2 / 3.0, 3, axis=1)
        atoms = Atoms(numbers=spec.atoms.numbers, positions=frame.positions, cell=frame.cell, pbc=spec.atoms.pbc,
                      momenta=momenta_at.get(int(step)))
        scores = {**s, "energy": float(energies.mean()), "forces": forces_comm.mean(axis=0)}
        frames.append(scored_frame(atoms, scores, step, spec.name, spec.temperature_at(step), alpha=spec.alpha,
                                   source="ipi"))
    stop_frame = run_dir / "stop.extxyz"
    if (run_dir / "stop.json").exists() and stop_frame.exists():
        last = read(stop_frame)
        step = int(last.info[keys.STEP])
        last.info[TEMPERATURE_K] = spec.temperature_at(step)
        if step in momenta_at:  # i-PI wrote this step (a stride step): the driver does not see momenta
            last.set_momenta(momenta_at[step])
        frames = [f for f in frames if int(f.info[keys.STEP]) < step] + [last]
    return frames
