"""An i-PI socket client that serves a whole committee (``alflow ipi-driver``).

Protocol (i-PI's, read strictly in order: since i-PI 3.2 the server may send
POSDATA and GETFORCE back to back without a STATUS in between):

    server → STATUS            client → READY | HAVEDATA | NEEDINIT
    server → INIT  i32 bead, i32 n, n bytes
    server → POSDATA  cell (9 f64), inverse cell (9 f64), i32 natoms, positions (3N f64)
    server → GETFORCE          client → FORCEREADY, f64 energy, i32 natoms, forces (3N f64),
                                         virial (9 f64), i32 n, n bytes of JSON extras
    server → EXIT              client exits 0

One driver process can serve several i-PI servers (one per walker, ``Target``), and
several connections to each (one per bead for path integrals): it waits on all
sockets at once (``select``), holds every POSDATA it receives, and evaluates the held
structures in one committee call when every live connection has one (or when the
first has waited ``gather_s``), then answers each with its own results.

Stop rules (the ASE engine's, :mod:`alflow.explore.ase_md`): a walker whose committee
max force deviation stays above ``upper`` for ``patience`` MD steps is ``UNCERTAIN``;
one with non-finite results or two atoms closer than ``min_distance`` is ``EXPLODED``.
The driver writes the stopping frame (scored) to ``stop.extxyz`` and the verdict to
``stop.json`` in the walker's run directory and creates i-PI's soft-exit file ``EXIT``
there, so i-PI finishes the step, writes its outputs and exits.

Units on the wire are atomic (Hartree, Bohr); the cell arrives with lattice
vectors as columns (we transpose to ASE's rows) in i-PI's rotated, upper-triangular
frame; forces and the virial (−V·σ, not the stress) are returned in that frame.
The extras carry ``committee_pot`` (K energies, Ha), ``committee_force`` (K lists
of 3N, Ha/Bohr) and ``committee_virial`` (K lists of 9, Ha) so that i-PI's
``<ffcommittee parse_json="true">`` computes the committee uncertainty, and
``force_deviation`` (N, eV/Å, calibrated: the model's own per-atom score, which i-PI
records as ``committee_force_deviation``; a shallow committee in ``mean`` mode scores
the heads' energy spread, which its identical member forces cannot show).

Spread where it is read (``Target.spread_stride``): i-PI records the extras of the
initial structure and of every ``stride``-th step after it, that is of evaluations 0,
stride, 2·stride, … of each walker (one evaluation per bead and MD step). Only those
answers carry the members' forces and virials (``committee_force``,
``committee_virial``: K × 3N numbers through JSON on both sides); the others carry
``committee_pot`` and the scores, and i-PI uses the mean forces. A shallow committee
with per-head forces also skips its heads' K backward passes there (mean forces at one
model's cost; ``force_deviation`` is NaN and the stop rule keeps its last look). Give
the stride of the i-PI input's trajectories (``alflow`` does); 1 (the default) sends
everything every step.
"""

from __future__ import annotations

import json
import math
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io import write

from alflow import keys
from alflow.explore.evaluator import ModelEvaluator

HEADER = 12
BOHR = units.Bohr  # Å per Bohr
HARTREE = units.Hartree  # eV per Hartree
DEFAULT_PREFIX = "/tmp/ipi_"
READ_TIMEOUT = 300.0  # s without a message from a connected i-PI server (it polls STATUS every step) before giving up


class ServerGone(ConnectionError):
    """The i-PI server closed the connection (or vanished) without EXIT."""


def unix_socket_path(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """i-PI's socket file for address ``name``: ``prefix + name`` (``/tmp/ipi_NAME`` by default)."""
    return f"{prefix}{name}"


def connect(unix: str | None = None, host: str = "localhost", port: int | None = None,
            prefix: str = DEFAULT_PREFIX, timeout: float = 60.0) -> socket.socket:
    """Connect to i-PI, polling until the socket exists or ``timeout`` (s) passes."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            if unix is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(unix_socket_path(unix, prefix))
            else:
                if port is None:
                    raise ValueError("port: required with --host (or give --unix NAME)")
                sock = socket.create_connection((host, port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay per step
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                where = unix_socket_path(unix, prefix) if unix is not None else f"{host}:{port}"
                raise TimeoutError(f"no i-PI server at {where} after {timeout:.0f} s ({exc})") from None
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


@dataclass
class StopRules:
    """When a walker stops early (as in the ASE engine). Units: eV/Å, MD steps, Å."""

    upper: float = math.inf  # max force deviation above which a step counts as uncertain
    patience: int = 20  # consecutive uncertain steps before UNCERTAIN
    min_distance: float = 0.0  # closer atoms: EXPLODED


@dataclass
class Target:
    """One i-PI server to serve: where it listens, what it simulates, where its walker's files go."""

    template: Atoms  # species, periodicity and atom order of i-PI's initial structure
    unix: str | None = None  # unix socket address (file prefix + unix)
    host: str = "localhost"
    port: int | None = None
    prefix: str = DEFAULT_PREFIX
    connections: int = 1  # connections to open: one per bead lets i-PI send every bead at once
    spread_stride: int = 1  # MD steps between the steps whose committee spread i-PI records (module docstring)
    run_dir: Path | None = None  # stop.json, stop.extxyz and the soft-exit file EXIT go here
    name: str = "ipi"
    # filled while serving
    evaluations: int = 0
    rule: Any = None  # alflow.explore.frames.StopRule, one per target
    step_worst: tuple[Atoms, dict[str, Any]] | None = None  # the bead that decides this step's verdict
    stopped: bool = False

    def where(self) -> str:
        return unix_socket_path(self.unix, self.prefix) if self.unix is not None else f"{self.host}:{self.port}"


@dataclass
class _Channel:
    """One connection to one target, with i-PI's protocol state."""

    sock: socket.socket
    target: Target
    status: str = "NEEDINIT"
    pending: tuple[np.ndarray, np.ndarray] | None = None  # (cell rows Å, positions Å) awaiting evaluation
    since: float = 0.0
    result: tuple[float, np.ndarray, np.ndarray, bytes] | None = None
    done: bool = False
    gone: str = ""
    buffer: bytearray = field(default_factory=bytearray)
    last: float = field(default_factory=time.monotonic)  # when the server last sent something (or we held its step)


def _recv(sock: socket.socket, nbytes: int) -> bytes:
    chunks, remaining = [], nbytes
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:  # orderly shutdown or vanished server: never spin
            raise ServerGone("i-PI server closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv_array(sock: socket.socket, count: int, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    return np.frombuffer(_recv(sock, count * dtype.itemsize), dtype=dtype).copy()


def _send_header(sock: socket.socket, message: str) -> None:
    sock.sendall(message.ljust(HEADER).encode())


def _badness(r: dict[str, Any], min_distance: float, max_force: float) -> tuple[bool, bool, float]:
    """Orders one step's bead evaluations for the stop rules: non-finite first, then atoms too close or
    forces too large (EXPLODED), then by max force deviation (UNCERTAIN)."""
    forces = np.asarray(r["forces"])
    finite = bool(np.isfinite(r["energy"]) and np.isfinite(forces).all())
    exploded = finite and (float(r["min_distance"]) < min_distance or float(np.abs(forces).max(initial=0.0)) > max_force)
    deviation = float(r[keys.MAX_FORCE_DEVIATION])
    return (not finite, exploded, deviation if np.isfinite(deviation) else math.inf)


def reply(r: dict[str, Any], cell_ase: np.ndarray, periodic: bool, members: bool = True
          ) -> tuple[float, np.ndarray, np.ndarray, bytes]:
    """Energy (Ha), forces (N, 3 Ha/Bohr), virial (3x3 Ha, i-PI layout) and JSON extras of one evaluation.

    ``members=False`` (a step i-PI does not record): ``committee_force`` and ``committee_virial`` are left
    out, so that i-PI's committee uses the mean forces and virial.
    """
    volume = abs(np.linalg.det(cell_ase)) if periodic else 0.0
    stress = r["stress"] if r["stress"] is not None else np.zeros((3, 3))
    virial = -volume * stress  # eV
    extras: dict[str, Any] = {}
    if "energies" in r:
        extras["committee_pot"] = (np.asarray(r["energies"]) / HARTREE).tolist()
        k = len(r["energies"])
        if members:
            extras["committee_force"] = (np.asarray(r["forces_comm"]) * BOHR / HARTREE).reshape(k, -1).tolist()
            member_stress = r.get("stress_comm", np.zeros((k, 3, 3)))
            member_virial = -volume * np.asarray(member_stress)
            extras["committee_virial"] = (member_virial.transpose(0, 2, 1) / HARTREE).reshape(k, 9).tolist()
        extras["max_force_deviation"] = r["max_force_deviation"]
    extras["force_deviation"] = np.asarray(r.get("force_deviation", np.zeros(len(r["forces"]))), dtype=float).tolist()
    energy = r["energy"] / HARTREE
    forces = np.asarray(r["forces"]) * BOHR / HARTREE
    return energy, forces, virial / HARTREE, json.dumps(extras).encode()


class IPIDriver:
    """Answers the requests of one or more i-PI servers with a Potential or Committee (``model``).

    ``targets``: the servers (see :class:`Target`); each template's atoms must be in the
    order of that server's initial structure. ``gather_s`` (s): how long the first held
    request waits for the others before the batch is evaluated without them.
    """

    def __init__(self, model: Any, targets: list[Target] | Atoms, device: str | None = "auto",
                 rules: StopRules | None = None, gather_s: float = 0.05) -> None:
        self.evaluate = model if isinstance(model, ModelEvaluator) else ModelEvaluator(model, device)
        self.targets = [Target(template=targets)] if isinstance(targets, Atoms) else list(targets)
        self.rules = rules or StopRules()
        self.gather_s = float(gather_s)
        self.steps = 0  # structures evaluated
        self.calls = 0  # committee calls (one per gathered batch)
        self.channels: list[_Channel] = []
        self.read_timeout: float | None = READ_TIMEOUT  # s of silence from a connected server; None: wait forever

    # ------------------------------------------------------------------ connections

    def connect_all(self, timeout: float = 60.0) -> None:
        """Open ``connections`` sockets to every target (each polled up to ``timeout`` s)."""
        for target in self.targets:
            for _ in range(max(1, target.connections)):
                sock = connect(unix=target.unix, host=target.host, port=target.port, prefix=target.prefix, timeout=timeout)
                self.channels.append(_Channel(sock, target))

    # ------------------------------------------------------------------ physics

    def compute(self, cell_ase: np.ndarray, positions: np.ndarray, target: Target | None = None
                ) -> tuple[float, np.ndarray, np.ndarray, bytes]:
        """One structure's reply (see :func:`reply`), outside the gathered batches."""
        target = target or self.targets[0]
        atoms = Atoms(numbers=target.template.numbers, positions=positions, cell=cell_ase, pbc=target.template.pbc)
        [r] = self.evaluate([atoms])
        return reply(r, cell_ase, bool(atoms.pbc.all()))

    def _evaluate_pending(self) -> None:
        """One committee call for every held structure; answers are stored per channel, stop rules applied."""
        held = [c for c in self.channels if c.pending is not None and not c.done]
        frames = []
        seen: dict[int, int] = {}  # evaluations of each target in this batch so far (its beads)
        spread = False
        for c in held:
            cell, positions = c.pending
            t = c.target.template
            frames.append(Atoms(numbers=t.numbers, positions=positions, cell=cell, pbc=t.pbc))
            index = c.target.evaluations + seen.get(id(c.target), 0)
            seen[id(c.target)] = seen.get(id(c.target), 0) + 1
            spread = spread or (index // max(1, c.target.connections)) % max(1, c.target.spread_stride) == 0
        try:
            results: list[Any] = self.evaluate(frames, spread=spread)
        except Exception:  # noqa: BLE001 - find the structure that fails; the others must not fail with it
            results = []
            for atoms in frames:
                try:
                    results.extend(self.evaluate([atoms], spread=spread))
                except Exception as exc:  # noqa: BLE001 - this walker's failure stays its own
                    results.append(exc)
        self.calls += 1
        for c, atoms, r in zip(held, frames, results):
            c.pending = None
            c.status = "HAVEDATA"
            self.steps += 1
            if isinstance(r, Exception):  # answer with zeros so that i-PI can finish the step, then stop it
                c.result = (0.0, np.zeros((len(atoms), 3)), np.zeros((3, 3)), b"{}")
                c.target.evaluations += 1
                if not c.target.stopped:
                    self._stop(c.target, None, None, c.target.evaluations // max(1, c.target.connections),
                               "ERROR", f"the model failed on this walker's structure: {type(r).__name__}: {r}")
                continue
            # the members' forces go to i-PI only where it records them: less JSON on the other steps
            c.result = reply(r, atoms.cell.array, bool(atoms.pbc.all()), members=spread)
            self._judge(c.target, atoms, r)

    def _judge(self, target: Target, atoms: Atoms, r: dict[str, Any]) -> None:
        """Apply the stop rules (:class:`alflow.explore.frames.StopRule`, the ASE engine's) to ``target``'s
        MD step once all its beads are evaluated; the bead that decides is the worst one."""
        from alflow.explore.frames import DONE, StopRule

        beads = max(1, target.connections)
        step = target.evaluations // beads  # evaluation 0 is the initial structure (step 0)
        target.evaluations += 1
        if target.stopped:
            return
        if target.rule is None:
            target.rule = StopRule(self.rules.upper, self.rules.patience, self.rules.min_distance)
        rule = target.rule
        if target.step_worst is None or (_badness(r, rule.min_distance, rule.max_force)
                                         > _badness(target.step_worst[1], rule.min_distance, rule.max_force)):
            target.step_worst = (atoms, r)
        if target.evaluations % beads:
            return
        atoms, r = target.step_worst
        target.step_worst = None
        status, message = target.rule.update(r)
        if status != DONE:
            self._stop(target, atoms, r, step, status, message)

    def _stop(self, target: Target, atoms: Atoms | None, r: dict[str, Any] | None, step: int, status: str,
              message: str) -> None:
        """Record the verdict (``stop.json``), the scored stopping frame when there is one
        (``stop.extxyz``), and ask i-PI to stop (``EXIT``) in the walker's run directory."""
        from alflow.explore.frames import scored_frame

        target.stopped = True
        print(f"alflow ipi-driver: {target.name} {status} at step {step}: {message}", file=sys.stderr)
        if target.run_dir is None:
            return
        run_dir = Path(target.run_dir)
        if atoms is not None and r is not None:
            alpha = getattr(self.evaluate.model, "alpha", None)
            frame = scored_frame(atoms, r, step, target.name, float("nan"), source="ipi",
                                 alpha=None if alpha is None else float(alpha))
            write(run_dir / "stop.extxyz", frame, format="extxyz")
        (run_dir / "stop.json").write_text(json.dumps({"status": status, "message": message, "step": step}))
        (run_dir / "EXIT").touch()  # i-PI's soft exit: it finishes this step, writes its outputs and stops

    # ------------------------------------------------------------------ loop

    def _handle(self, c: _Channel) -> None:
        """Read and answer one message of channel ``c``."""
        sock = c.sock
        message = _recv(sock, HEADER).decode().strip()
        if message == "STATUS":
            _send_header(sock, c.status)
        elif message == "INIT":
            _recv_array(sock, 1, np.int32)  # bead index
            length = int(_recv_array(sock, 1, np.int32)[0])
            _recv(sock, length)  # init string (unused)
            c.status = "READY"
        elif message == "POSDATA":
            cell = _recv_array(sock, 9, np.float64).reshape(3, 3).T * BOHR  # columns → ASE rows
            _recv_array(sock, 9, np.float64)  # inverse cell (unused)
            natoms = int(_recv_array(sock, 1, np.int32)[0])
            if natoms != len(c.target.template):
                raise ValueError(
                    f"i-PI at {c.target.where()} sent {natoms} atoms but the template structure has "
                    f"{len(c.target.template)} (is --structure the same file as i-PI's initial structure?)"
                )
            positions = _recv_array(sock, 3 * natoms, np.float64).reshape(natoms, 3) * BOHR
            c.pending = (cell, positions)
            c.since = time.monotonic()
            c.status = "READY"  # not asked again before the batch is evaluated (the channel is not read)
        elif message == "GETFORCE":
            if c.result is None:
                raise RuntimeError(f"i-PI at {c.target.where()} asked for forces before sending positions")
            energy, forces, virial, extras = c.result
            _send_header(sock, "FORCEREADY")
            sock.sendall(np.float64(energy).tobytes())
            sock.sendall(np.int32(len(forces)).tobytes())
            sock.sendall(np.ascontiguousarray(forces, dtype=np.float64).tobytes())
            sock.sendall(np.ascontiguousarray(virial.T, dtype=np.float64).tobytes())
            sock.sendall(np.int32(len(extras)).tobytes())
            sock.sendall(extras)
            c.result = None
            c.status = "READY"
        elif message == "EXIT":
            c.done = True
        else:
            raise RuntimeError(f"unexpected i-PI message {message!r} from {c.target.where()}")

    def serve(self, sock: socket.socket | None = None) -> int:
        """Answer every connection until each got EXIT (returns 0) or its server vanished (returns 1).

        ``sock``: one already-connected socket for the first target (the single-server form).
        A server that vanishes ends only its own connections; the others are served on.
        """
        if sock is not None:
            self.channels.append(_Channel(sock, self.targets[0]))
        limit = self.read_timeout
        for c in self.channels:  # a server that stalls inside a message: recv raises TimeoutError
            c.sock.settimeout(limit)
            c.last = time.monotonic()
        try:
            while True:
                live = [c for c in self.channels if not c.done]
                if not live:
                    break
                now = time.monotonic()
                for c in live:
                    if c.pending is not None:
                        c.last = now  # waiting for us, not for the server
                    elif limit is not None and now - c.last > limit:
                        c.done, c.gone = True, f"no message for {limit:g} s"
                        print(f"alflow ipi-driver: i-PI at {c.target.where()} sent nothing for {limit:g} s "
                              f"(--read-timeout) after {c.target.evaluations} evaluations: giving up on it",
                              file=sys.stderr)
                live = [c for c in live if not c.done]
                if not live:
                    break
                held = [c for c in live if c.pending is not None]
                if held and (len(held) == len(live) or time.monotonic() - min(c.since for c in held) >= self.gather_s):
                    self._evaluate_pending()
                    continue
                readable = [c for c in live if c.pending is None]
                wait = self.gather_s if held else 1.0
                if limit is not None:
                    wait = min(wait, max(0.01, limit))
                ready, _, _ = select.select([c.sock for c in readable], [], [], wait)
                for c in readable:
                    if c.sock in ready:
                        try:
                            self._handle(c)
                            c.last = time.monotonic()
                        except (ServerGone, BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
                            c.done, c.gone = True, str(exc)
                            print(f"alflow ipi-driver: server gone ({c.target.where()}) after "
                                  f"{c.target.evaluations} evaluations ({exc})", file=sys.stderr)
        finally:
            for c in self.channels:
                c.sock.close()
            print(f"alflow ipi-driver: {self.steps} evaluations in {self.calls} committee calls, "
                  f"{self.evaluate.spread_calls} of them with the committee spread "
                  f"({len(self.targets)} server(s), {len(self.channels)} connection(s))", file=sys.stderr)
        return 1 if any(c.gone for c in self.channels) else 0


def run_driver(model_path: str | Path, structure: str | Path | list[str | Path], *, unix: str | list[str] | None = None,
               host: str = "localhost", port: int | None = None, prefix: str = DEFAULT_PREFIX, device: str = "auto",
               timeout: float = 60.0, connections: int | list[int] = 1, run_dir: str | Path | list[str | Path] | None = None,
               rules: StopRules | None = None, gather_s: float = 0.05, read_timeout: float | None = READ_TIMEOUT,
               spread_stride: int | list[int] = 1) -> int:
    """Load the model and templates, connect to every server, and serve until each sent EXIT; returns the exit code.

    ``unix`` may name several servers; ``structure``, ``connections`` and ``run_dir`` are
    then one value for all or one per server. ``read_timeout`` (s): a connected server that
    sends nothing for this long is given up (its connections end, exit code 1); None waits forever.
    ``spread_stride``: the stride of each server's recorded committee extras (module docstring).
    """
    import potentials
    from alflow.explore.structures import read_structure

    addresses: list[str | None] = list(unix) if isinstance(unix, (list, tuple)) else [unix]
    n = len(addresses)

    def per_server(value: Any, name: str) -> list[Any]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ValueError(f"{name}: give one value or one per server ({n}), got {len(values)}")
        return values

    structures = per_server(structure, "--structure")
    counts = per_server(connections, "--connections")
    dirs = per_server(run_dir, "--run-dir")
    strides = per_server(spread_stride, "--spread-stride")
    for stride in strides:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"--spread-stride: expected MD steps >= 1, got {stride!r}")
    templates = {str(s): read_structure(s) for s in structures}
    targets = [Target(template=templates[str(s)], unix=a, host=host, port=port, prefix=prefix, connections=int(k),
                      run_dir=None if d is None else Path(d), name=Path(d).name if d is not None else (a or "ipi"),
                      spread_stride=stride)
               for a, s, k, d, stride in zip(addresses, structures, counts, dirs, strides)]
    model = potentials.load(model_path, device=None if device == "auto" else device)
    if getattr(model, "architecture", None) == "mace":  # cuEquivariance kernels on CUDA, where installed
        from potentials.mace import maybe_cueq

        model = maybe_cueq(model, ModelEvaluator(model, device).device)
    driver = IPIDriver(model, targets, device=device, rules=rules, gather_s=gather_s)
    driver.read_timeout = read_timeout
    driver.connect_all(timeout=timeout)
    return driver.serve()
