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
import math
import operator
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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
    from alflow.fileio import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as handle:  # the user's umask, as every file alflow writes
        torch.save(obj, handle)
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
    try:
        payload["metadata"] = json.loads(payload["metadata"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata is not a JSON string ({exc})") from None
    if not isinstance(payload["metadata"], dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: expected a metadata mapping and a state_dict")
    return payload


# ------------------------------------------------------------------ bounds on what a checkpoint may ask for
MAX_HPARAM_INT = 65_536  # any integer hyperparameter (widths, layers, basis sizes)
MAX_HPARAM_FLOAT = 1e6  # |float hyperparameter|
MAX_HPARAM_ITEMS = 256  # entries of a list/dict hyperparameter
MAX_HPARAM_TEXT = 1_000  # characters of a string hyperparameter
MAX_HPARAM_DEPTH = 4  # nesting of lists/dicts
MAX_CHECKPOINT_CUTOFF = 100.0  # Å
MAX_MEMBERS = 256  # committee members
BUILD_TENSOR_MIN = 4_000_000  # elements one tensor made while building may have, at least (4x the largest stored)
BUILD_TOTAL = 1_000_000_000  # elements all tensors made while building may have together (+ 64x the stored ones)
META_MARGIN = 2_500_000  # elements a meta-device build may make beyond 8x the stored ones (measured: 3x; e3nn: 1e6 at once)
REGISTERED_MARGIN = 100_000  # parameter/buffer elements a model may register beyond 1.1x the stored ones
DTYPES = ("float32", "float64")


def _check_value(value: Any, where: str, depth: int = 0) -> None:
    """A hyperparameter value is plain data of bounded size (``CheckpointError`` naming ``where``)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_HPARAM_INT:
            raise CheckpointError(f"{where} = {value}: expected an integer of at most {MAX_HPARAM_INT}")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_HPARAM_FLOAT:
            raise CheckpointError(f"{where} = {value!r}: expected a finite number of at most {MAX_HPARAM_FLOAT:g}")
    elif isinstance(value, str):
        if len(value) > MAX_HPARAM_TEXT:
            raise CheckpointError(f"{where}: a string of {len(value)} characters; expected at most {MAX_HPARAM_TEXT}")
    elif isinstance(value, (list, tuple, dict)):
        if depth >= MAX_HPARAM_DEPTH or len(value) > MAX_HPARAM_ITEMS:
            raise CheckpointError(f"{where}: {len(value)} entries at nesting depth {depth + 1}; expected at most "
                                  f"{MAX_HPARAM_ITEMS} entries and depth {MAX_HPARAM_DEPTH}")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_value(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]", depth + 1)
    else:
        raise CheckpointError(f"{where}: a {type(value).__name__}; expected numbers, strings, lists or mappings")


def check_metadata(meta: Any, where: str = "checkpoint") -> None:
    """Bound a potential's checkpoint metadata before anything is built from it.

    Raises ``CheckpointError`` naming the field: unknown architecture or hyperparameter, species
    that are not 1..118 distinct elements, a cutoff outside (0, ``MAX_CHECKPOINT_CUTOFF``] Å, a
    dtype other than float32/float64, hyperparameter values beyond the ``MAX_HPARAM_*`` bounds.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata must be a mapping, got {type(meta).__name__}")
    arch = meta.get("architecture")
    if not isinstance(arch, str) or arch.lower() not in ARCHITECTURES:
        raise CheckpointError(f"{where}: metadata.architecture = {arch!r}; expected one of {', '.join(available())}")
    species = meta.get("species")
    if not isinstance(species, list) or not 1 <= len(species) <= 118:
        raise CheckpointError(f"{where}: metadata.species must be a list of 1 to 118 elements")
    for z in species:
        if isinstance(z, bool) or not (isinstance(z, int) and 1 <= z <= 118 or isinstance(z, str) and len(z) <= 3):
            raise CheckpointError(f"{where}: metadata.species contains {z!r}; expected atomic numbers 1..118")
    cutoff = meta.get("cutoff")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= MAX_CHECKPOINT_CUTOFF:
        raise CheckpointError(f"{where}: metadata.cutoff = {cutoff!r}; expected a number in (0, "
                              f"{MAX_CHECKPOINT_CUTOFF:g}] Å")
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{where}: metadata.dtype = {meta.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    hparams = meta.get("hparams", {})
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{where}: metadata.hparams must be a mapping")
    allowed = get_class(arch).hparam_names()
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: metadata.hparams has unknown hyperparameter(s) {', '.join(map(str, unknown))} "
                              f"for {arch!r}; allowed: {', '.join(allowed) or '(none)'}")
    for name, value in hparams.items():
        _check_value(value, f"{where}: metadata.hparams.{name}")


def _as_int(value: Any) -> int | None:
    try:
        return operator.index(value)
    except TypeError:
        return None


def _factory_elements(func: Any, args: tuple, kwargs: dict) -> int:
    """Elements a tensor factory (``torch.empty``, ``zeros``, ``randn``, ``full``, ``arange``, ...) is about to make."""
    name = getattr(func, "__name__", "")
    try:
        if name.endswith("_like") or name in ("tensor", "as_tensor", "asarray", "from_numpy", "frombuffer"):
            return 0  # the size of something that exists already
        if name in ("arange", "range"):
            nums = [float(a) for a in args if _as_int(a) is not None or isinstance(a, float)]
            start, end, step = (0.0, nums[0], 1.0) if len(nums) == 1 else (nums + [1.0])[:3] if nums else (0, 0, 1)
            return max(0, math.ceil((float(end) - float(start)) / float(step))) if step else 0
        if name in ("linspace", "logspace"):
            return _as_int(args[2] if len(args) > 2 else kwargs.get("steps", 0)) or 0
        if name == "eye":
            n = _as_int(args[0] if args else kwargs.get("n", 0)) or 0
            m = _as_int(args[1]) if len(args) > 1 and _as_int(args[1]) is not None else kwargs.get("m", n)
            return n * (_as_int(m) or 0)
        size = kwargs.get("size")
        if size is None:
            size = next((a for a in args if isinstance(a, (list, tuple, torch.Size))), None)
        if size is None:
            size = []
            for a in args:
                if _as_int(a) is None or isinstance(a, bool):
                    break
                size.append(a)
        return math.prod(_as_int(n) or 0 for n in size) if size else 0
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return 0


try:  # the functions that create tensors (what ``torch.device(...)`` as a context redirects)
    from torch.utils._device import _device_constructors as _constructors

    _FACTORIES = frozenset(_constructors())
except Exception:  # noqa: BLE001 - a private torch helper: fall back to the common ones
    _FACTORIES = frozenset(getattr(torch, n) for n in ("empty", "zeros", "ones", "full", "rand", "randn", "randint",
                                                        "arange", "linspace", "logspace", "eye", "empty_strided"))


class _AllocationGuard(TorchFunctionMode):
    """While a model is built from checkpoint metadata: refuses (``CheckpointError``) a tensor factory call
    (``torch.empty``, ``zeros``, ``randn``, ...) for more than ``one`` elements, or more than ``total`` in all,
    before it allocates, and more than ``registered``
    elements of parameters and buffers registered by modules (this thread only): a model larger than the
    stored weights stops at once, on the meta device as on the CPU."""

    def __init__(self, one: int, total: int, where: str, registered: int | None = None) -> None:
        super().__init__()
        self.one, self.total, self.used, self.where = one, total, 0, where
        self.registered, self.seen, self.thread, self.hooks = registered, 0, threading.get_ident(), []

    def _on_register(self, module: Any, name: str, tensor: Any) -> None:
        if tensor is None or self.registered is None or threading.get_ident() != self.thread:
            return
        self.seen += tensor.numel()
        if self.seen > self.registered:
            raise CheckpointError(
                f"{self.where}: the model its metadata describes has more than {self.seen:,} weights, the file "
                f"holds {self.registered:,} at most (module {type(module).__name__}, {name!r}): the metadata "
                "does not describe the stored weights")

    def __enter__(self) -> _AllocationGuard:
        from torch.nn.modules import module as nn_module

        self.hooks = [nn_module.register_module_parameter_registration_hook(self._on_register),
                      nn_module.register_module_buffer_registration_hook(self._on_register)]
        try:
            return super().__enter__()
        except BaseException:
            self._remove_hooks()
            raise

    def __exit__(self, *exc: Any) -> Any:
        self._remove_hooks()
        return super().__exit__(*exc)

    def _remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and threading.get_ident() == self.thread:
            want = _factory_elements(func, args, kwargs)
            if want > self.one or self.used + want > self.total:
                raise CheckpointError(
                    f"{self.where}: building the model from its metadata would allocate a tensor of {want:,} "
                    f"elements ({self.used:,} so far; limits {self.one:,} per tensor, {self.total:,} in all, from "
                    "the size of the stored weights): the metadata does not describe the stored weights")
            self.used += want
        return func(*args, **kwargs)


def _compare_state(expected: dict[str, torch.Tensor], stored: dict[str, Any], where: str) -> None:
    """Names and shapes of ``expected`` (the model's state dict) and ``stored`` agree, else ``CheckpointError``."""
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{where}: the stored weights do not match the metadata's model (missing: "
                              f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(extra[:5]) or 'none'})")
    for key, tensor in expected.items():
        got = stored[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"{where}: weight {key!r} has shape {shape}; the metadata's model needs "
                                  f"{tuple(tensor.shape)}")


def model_from_checkpoint(payload: dict[str, Any], where: str = "checkpoint") -> Potential:
    """Rebuild one potential from its metadata and state dict, bounding what the metadata may ask for.

    ``check_metadata`` first; then the model is built on the meta device (no memory; stopped once it
    makes 8x more elements than the file holds) and its weight names and shapes are compared with
    the stored ones, so a real build allocates what the file holds.
    An architecture that cannot be built on the meta device is built under an allocation guard
    (tensors at most 4x the largest stored one, 64x all stored ones in all, plus fixed margins).
    ``where`` names the file (and member) in messages.
    """
    meta, state = payload["metadata"], payload["state_dict"]
    check_metadata(meta, where)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{where}: state_dict must map names to tensors")
    args = dict(species=meta["species"], cutoff=float(meta["cutoff"]), **meta.get("hparams", {}))
    sizes = [t.numel() for t in state.values()] or [0]
    one = max(BUILD_TENSOR_MIN, 4 * max(sizes))
    weights = int(1.1 * sum(sizes)) + REGISTERED_MARGIN  # measured: stored + 119..720 (non-persistent buffers)
    try:  # meta tensors cost no memory; the guard stops a model larger than the file early (time)
        with torch.device("meta"), _AllocationGuard(one, 8 * sum(sizes) + META_MARGIN, where, weights):
            shadow = build(meta["architecture"], **args)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - e.g. e3nn computes constants while building: use the guard below
        shadow = None
    try:
        if shadow is not None:
            _compare_state(shadow.state_dict(), state, where)
            model = build(meta["architecture"], **args)
        else:
            with _AllocationGuard(one, BUILD_TOTAL + 64 * sum(sizes), where, weights):
                model = build(meta["architecture"], **args)
        model.to(getattr(torch, meta["dtype"]))
        model.load_state_dict(state)
    except CheckpointError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: cannot rebuild the {meta['architecture']!r} model from its metadata "
                              f"({type(exc).__name__}: {str(exc)[:500]})") from exc
    return model


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a Potential (or a Committee) from ``path`` onto ``device`` (default: CUDA if present)."""
    from alflow.devices import resolve_device

    device = resolve_device(device)  # before reading: an unusable device fails first, as DeviceError
    payload = read_checkpoint(path, device="cpu")
    kind = payload.get("kind", "potential")
    if kind == "potential":
        model = model_from_checkpoint(payload, str(path))
    elif kind == "committee":
        from potentials.committee import Committee

        model = Committee.from_checkpoint(payload, where=str(path))
    elif kind == "shallow":
        from potentials.shallow import ShallowCommittee

        model = ShallowCommittee.from_checkpoint(payload, where=str(path))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}")
    return model.to(device).eval()
