"""Import e3nn and mace-torch safely under torch >= 2.6.

Two problems, both handled here in code (users never set environment variables):

1. mace-torch pins e3nn 0.4.4, whose import runs ``torch.load(constants.pt)``
   without ``weights_only``. Since torch 2.6 that means ``weights_only=True``,
   which refuses the ``slice`` objects in the file, so ``import e3nn.o3``
   fails. :func:`prepare_e3nn` allow-lists ``slice`` (a plain built-in that
   cannot run code) for weights-only loading before e3nn is imported.
2. ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the process
   environment, which silently makes *every* later ``torch.load`` without an
   explicit ``weights_only`` unpickle arbitrary code — in this process and in
   every subprocess it starts. :func:`import_mace` imports mace and puts the
   variable back as it was; ``import_mace("mace.calculators")`` does the same for
   other mace modules (``mace.calculators`` sets the variable again when imported
   directly). alflow always passes ``weights_only`` explicitly. mace's import-time
   notice about cuequivariance, printed to stdout, goes to this module's debug log
   so that it cannot corrupt machine-readable output.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_prepared = False


def prepare_e3nn() -> ModuleType:
    """Allow-list ``slice`` for weights-only ``torch.load`` and import ``e3nn.o3``; idempotent."""
    global _prepared
    if not _prepared:
        add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
        if add_safe_globals is not None:  # torch < 2.4 loads with weights_only=False anyway
            add_safe_globals([slice])
        _prepared = True
    return importlib.import_module("e3nn.o3")


def import_mace(name: str = "mace.modules") -> ModuleType:
    """A mace-torch module (default ``mace.modules``), imported after :func:`prepare_e3nn`,
    without leaking mace's environment change.

    Code using ``mace.calculators.MACECalculator`` imported this way passes
    ``models=[torch.load(path, weights_only=False)]`` (a trusted file) rather than
    ``model_paths``, which relies on the environment variable.
    """
    prepare_e3nn()
    before = os.environ.get(_ENV)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # mace prints a cuequivariance notice on import
            return importlib.import_module(name)
    finally:
        if printed.getvalue().strip():
            logger.debug("import %s: %s", name, printed.getvalue().strip())
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before
