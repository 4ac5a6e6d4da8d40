"""One error base for everything alflow reports to a user.

Every error a user can fix (a bad config field, a missing file, an oracle that
cannot be built, a corrupt checkpoint) derives from :class:`AlflowError`. The
``alflow`` command catches it once (``alflow.cli.main``), prints its message
(which names the thing and what was expected) without a traceback and exits
with :attr:`AlflowError.exit_code` (2 for bad input, 1 for a failure at run time).

Kinds (each also derives from the builtin exception it replaced, so existing
``except ValueError`` / ``except RuntimeError`` code keeps working):

- :class:`InputError` (``ValueError``, exit 2): bad input: config, data, files, devices.
- :class:`RuntimeFailure` (``RuntimeError``, exit 1): the work itself failed.
"""

from __future__ import annotations


class AlflowError(Exception):
    """Base of every error alflow reports to a user; the message names the thing and what was expected."""

    exit_code: int = 1


class InputError(AlflowError, ValueError):
    """Bad input (a file, a field, a device, an argument): exit code 2."""

    exit_code = 2


class RuntimeFailure(AlflowError, RuntimeError):
    """The work failed at run time (training diverged, a server died): exit code 1."""

    exit_code = 1


class FileMissingError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class DeviceError(InputError):
    """A device that does not exist here (``cuda`` without CUDA, an unknown name)."""
