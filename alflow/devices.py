"""The one device resolver: a device name from a config or a command line -> a usable ``torch.device``.

Accepted names: ``auto`` (or None: CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``
(and ``mps`` where PyTorch has it). Anything else, CUDA asked for where PyTorch has none, or a
CUDA index this machine does not have raises :class:`alflow.errors.DeviceError` naming the device
and what exists, before any work starts (instead of a bare ``AssertionError`` from deep inside torch).
"""

from __future__ import annotations

import torch

from alflow.errors import DeviceError

NAMES = ("auto", "cpu", "cuda", "cuda:N")
_TYPES = ("cpu", "cuda", "mps")


def _cuda_note() -> str:
    if not torch.backends.cuda.is_built():
        return f"this PyTorch ({torch.__version__}) was built without CUDA"
    return "no CUDA device is visible here (driver, CUDA_VISIBLE_DEVICES)"


def resolve_device(device: str | torch.device | None = "auto", *, what: str = "device") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` checked against this machine.

    ``what`` names the setting in the error message (``--device``, ``execution.device``).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in _TYPES:
            raise DeviceError(f"{what}: unknown device {str(device)!r}; expected one of {', '.join(NAMES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what}: {str(device)!r} requested but CUDA is not available: {_cuda_note()}; "
                              "use cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{what}: {str(device)!r} requested but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"{what}: {str(device)!r} requested but MPS is not available here; use cpu or auto")
    return dev

