"""The architecture registry and one-file checkpoints.

A checkpoint is data, never code: a dict of tensors plus a JSON metadata string,
saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, so a
downloaded model cannot run code when loaded. The metadata records the
architecture, hyperparameters, species, cutoff, dtype and the alflow version;
the architecture class is looked up in the registry below.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from alflow import __version__
from potentials.base import Potential
from alflow.errors import InputError

# registry name -> "module:Class". One row per architecture; nothing else to edit.
ARCHITECTURES: dict[str, str] = {
    "schnet": "potentials.schnet:SchNet",
    "painn": "potentials.painn:PaiNN",
    "mace": "potentials.mace:MACEPotential",
    "dtnn": "potentials.dtnn:DTNN",
    "physnet": "potentials.physnet:PhysNet",
    "ani": "potentials.ani:ANI",
    "aimnet2": "potentials.aimnet2:AIMNet2",
    "sake": "potentials.sake:SAKE",
    "dimenetpp": "potentials.dimenet:DimeNetPP",
    "tensornet": "potentials.tensornet:TensorNet",
}

CHECKPOINT_FORMAT = "alflow.potential"
CHECKPOINT_VERSION = 1


class CheckpointError(InputError):
    """A model file that is missing, corrupt or not an alflow checkpoint."""


def available() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(ARCHITECTURES)


def get_class(name: str) -> type[Potential]:
    """The class registered under ``name``; an unknown name lists what exists."""
    key = name.lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"architecture: unknown name {name!r}; available: {', '.join(available())}")
    module_name, class_name = ARCHITECTURES[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build(name: str, species: list[int | str], cutoff: float, **hparams: Any) -> Potential:
    """Build a fresh (randomly initialised) potential; unknown hyperparameters list the allowed ones."""
    cls = get_class(name)
    allowed = cls.hparam_names()
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"potential.hparams: unknown hyperparameter(s) {', '.join(unknown)} for {name!r}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return cls(species=species, cutoff=cutoff, **hparams)


def metadata(model: Potential) -> dict[str, Any]:
    """JSON-serialisable description of ``model`` (enough to rebuild it)."""
    dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    return {
        "architecture": model.architecture,
        "hparams": model.hparams,
        "species": model.species,
        "cutoff": model.cutoff,
        "dtype": str(dtype).removeprefix("torch."),
        "alflow_version": __version__,
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a Potential, or anything with ``checkpoint()``) to one file, atomically."""
    if hasattr(model, "checkpoint"):
        payload = model.checkpoint()  # e.g. a Committee
    else:
        payload = {"kind": "potential", "metadata": metadata(model), "state_dict": model.state_dict()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    payload["metadata"] = json.dumps(payload["metadata"])
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (metadata parsed), loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # corrupt file, or pickled code that weights_only refuses
        raise CheckpointError(f"{path}: not a readable alflow checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an alflow checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    payload["metadata"] = json.loads(payload["metadata"])
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> Potential:
    """Rebuild one potential from its metadata and state dict."""
    meta = payload["metadata"]
    model = build(meta["architecture"], species=meta["species"], cutoff=meta["cutoff"], **meta["hparams"])
    model.to(getattr(torch, meta["dtype"]))
    model.load_state_dict(payload["state_dict"])
    return model


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a Potential (or a Committee) from ``path`` onto ``device`` (default: CUDA if present)."""
    from alflow.devices import resolve_device

    device = resolve_device(device)  # before reading: an unusable device fails first, as DeviceError
    payload = read_checkpoint(path, device="cpu")
    kind = payload.get("kind", "potential")
    if kind == "potential":
        model = model_from_checkpoint(payload)
    elif kind == "committee":
        from potentials.committee import Committee

        model = Committee.from_checkpoint(payload)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}")
    return model.to(device).eval()
