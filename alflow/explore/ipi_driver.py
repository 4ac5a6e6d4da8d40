"""An i-PI socket client that serves a whole committee (``alflow ipi-driver``).

Protocol (i-PI's, read strictly in order: since i-PI 3.2 the server may send
POSDATA and GETFORCE back to back without a STATUS in between):

    server → STATUS            client → READY | HAVEDATA | NEEDINIT
    server → INIT  i32 bead, i32 n, n bytes
    server → POSDATA  cell (9 f64), inverse cell (9 f64), i32 natoms, positions (3N f64)
    server → GETFORCE          client → FORCEREADY, f64 energy, i32 natoms, forces (3N f64),
                                         virial (9 f64), i32 n, n bytes of JSON extras
    server → EXIT              client exits 0

Units on the wire are atomic (Hartree, Bohr); the cell arrives with lattice
vectors as columns (we transpose to ASE's rows) in i-PI's rotated, upper-triangular
frame; forces and the virial (−V·σ, not the stress) are returned in that frame.
The extras carry ``committee_pot`` (K energies, Ha), ``committee_force`` (K lists
of 3N, Ha/Bohr) and ``committee_virial`` (K lists of 9, Ha) so that i-PI's
``<ffcommittee parse_json="true">`` computes the committee uncertainty.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from alflow.explore.evaluator import ModelEvaluator

HEADER = 12
BOHR = units.Bohr  # Å per Bohr
HARTREE = units.Hartree  # eV per Hartree
DEFAULT_PREFIX = "/tmp/ipi_"


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


class IPIDriver:
    """Answers i-PI's requests with a Potential or Committee (``model``).

    ``template`` gives the atomic numbers and periodicity (i-PI sends positions only);
    its atoms must be in the order of i-PI's initial structure.
    """

    def __init__(self, model: Any, template: Atoms, device: str | None = "auto") -> None:
        self.evaluate = model if isinstance(model, ModelEvaluator) else ModelEvaluator(model, device)
        self.template = template
        self.sock: socket.socket | None = None
        self.status = "NEEDINIT"
        self.result: tuple[float, np.ndarray, np.ndarray, bytes] | None = None
        self.steps = 0

    # ------------------------------------------------------------------ wire

    def _recv(self, nbytes: int) -> bytes:
        chunks, remaining = [], nbytes
        while remaining:
            chunk = self.sock.recv(remaining)
            if not chunk:  # orderly shutdown or vanished server: never spin
                raise ServerGone("i-PI server closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _recv_array(self, count: int, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self._recv(count * dtype.itemsize), dtype=dtype).copy()

    def _send_header(self, message: str) -> None:
        self.sock.sendall(message.ljust(HEADER).encode())

    # ------------------------------------------------------------------ physics

    def compute(self, cell_ase: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, bytes]:
        """Energy (Ha), forces (N, 3 Ha/Bohr), virial (3x3 Ha, i-PI layout) and JSON extras."""
        atoms = Atoms(numbers=self.template.numbers, positions=positions, cell=cell_ase, pbc=self.template.pbc)
        [r] = self.evaluate([atoms])
        volume = abs(np.linalg.det(cell_ase)) if atoms.pbc.all() else 0.0
        stress = r["stress"] if r["stress"] is not None else np.zeros((3, 3))
        virial = -volume * stress  # eV
        extras: dict[str, Any] = {}
        if "energies" in r:
            extras["committee_pot"] = (np.asarray(r["energies"]) / HARTREE).tolist()
            k = len(r["energies"])
            extras["committee_force"] = (np.asarray(r["forces_comm"]) * BOHR / HARTREE).reshape(k, -1).tolist()
            member_stress = r.get("stress_comm", np.zeros((k, 3, 3)))
            member_virial = -volume * np.asarray(member_stress)
            extras["committee_virial"] = (member_virial.transpose(0, 2, 1) / HARTREE).reshape(k, 9).tolist()
            extras["max_force_deviation"] = r["max_force_deviation"]
        energy = r["energy"] / HARTREE
        forces = np.asarray(r["forces"]) * BOHR / HARTREE
        return energy, forces, virial / HARTREE, json.dumps(extras).encode()

    # ------------------------------------------------------------------ loop

    def serve(self, sock: socket.socket) -> int:
        """Answer messages until EXIT (returns 0) or the server disappears (returns 1)."""
        self.sock = sock
        try:
            while True:
                message = self._recv(HEADER).decode().strip()
                if message == "STATUS":
                    self._send_header(self.status)
                elif message == "INIT":
                    self._recv_array(1, np.int32)  # bead index
                    length = int(self._recv_array(1, np.int32)[0])
                    self._recv(length)  # init string (unused)
                    self.status = "READY"
                elif message == "POSDATA":
                    cell = self._recv_array(9, np.float64).reshape(3, 3).T * BOHR  # columns → ASE rows
                    self._recv_array(9, np.float64)  # inverse cell (unused)
                    natoms = int(self._recv_array(1, np.int32)[0])
                    if natoms != len(self.template):
                        raise ValueError(
                            f"i-PI sent {natoms} atoms but the template structure has {len(self.template)} "
                            "(is --structure the same file as i-PI's initial structure?)"
                        )
                    positions = self._recv_array(3 * natoms, np.float64).reshape(natoms, 3) * BOHR
                    self.result = self.compute(cell, positions)
                    self.status = "HAVEDATA"
                elif message == "GETFORCE":
                    if self.result is None:
                        raise RuntimeError("i-PI asked for forces before sending positions")
                    energy, forces, virial, extras = self.result
                    self._send_header("FORCEREADY")
                    self.sock.sendall(np.float64(energy).tobytes())
                    self.sock.sendall(np.int32(len(forces)).tobytes())
                    self.sock.sendall(np.ascontiguousarray(forces, dtype=np.float64).tobytes())
                    self.sock.sendall(np.ascontiguousarray(virial.T, dtype=np.float64).tobytes())
                    self.sock.sendall(np.int32(len(extras)).tobytes())
                    self.sock.sendall(extras)
                    self.result = None
                    self.status = "READY"
                    self.steps += 1
                elif message == "EXIT":
                    return 0
                else:
                    raise RuntimeError(f"unexpected i-PI message {message!r}")
        except (ServerGone, BrokenPipeError, ConnectionResetError) as exc:
            print(f"alflow ipi-driver: server gone after {self.steps} evaluations ({exc})", file=sys.stderr)
            return 1
        finally:
            sock.close()


def run_driver(model_path: str | Path, structure: str | Path, *, unix: str | None = None, host: str = "localhost",
               port: int | None = None, prefix: str = DEFAULT_PREFIX, device: str = "auto", timeout: float = 60.0) -> int:
    """Load the model and template, connect, and serve until EXIT; returns the exit code."""
    import potentials
    from alflow.explore.structures import read_structure

    model = potentials.load(model_path, device=None if device == "auto" else device)
    driver = IPIDriver(model, read_structure(structure), device=device)
    return driver.serve(connect(unix=unix, host=host, port=port, prefix=prefix, timeout=timeout))
