"""Secrets: ``${ENV_VAR}`` references in a config, and redaction of secret-looking values in records.

A config names a secret by reference, ``password: ${CP2K_LICENSE_PASSWORD}``, and
the value comes from the environment of the process that uses it. ``$$`` is a
literal ``$`` (so ``$${X}`` stays ``${X}``, e.g. for CP2K's own input preprocessor).

:func:`redact` returns a copy of a parameter mapping in which the value of every
secret-looking key (:data:`SECRET_KEY`: password, passphrase, secret, token,
api_key, access_key, private_key, credential(s), auth, ``key`` or ``*_key``) is
``"<redacted>"``; a value that is only an ``${ENV_VAR}`` reference is kept (it
names the variable, not the value). :func:`scrub` removes known secret values
from free text (error messages, log tails).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["REDACTED", "SECRET_KEY", "env_references", "expand_env", "is_secret_key", "redact", "scrub",
           "secret_values", "MissingEnvVar"]

REDACTED = "<redacted>"
SECRET_KEY = re.compile(
    r"passw|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth|(^|[_\-.])key$",
    re.IGNORECASE)
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ONLY_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
MIN_SCRUB = 4  # shorter values are not scrubbed from text (they would eat ordinary words)


class MissingEnvVar(KeyError):
    """An ``${VAR}`` reference to an environment variable that is not set; ``.var``, ``.where``."""

    def __init__(self, var: str, where: str) -> None:
        super().__init__(var)
        self.var, self.where = var, where

    def __str__(self) -> str:
        return f"{self.where}: environment variable {self.var} is not set (referenced as ${{{self.var}}})"


def is_secret_key(name: object) -> bool:
    """Whether a mapping key looks like it holds a secret (see :data:`SECRET_KEY`)."""
    return isinstance(name, str) and bool(SECRET_KEY.search(name))


def env_references(text: str) -> list[str]:
    """Names of the environment variables ``text`` references as ``${NAME}`` (``$$`` escapes)."""
    return [m.group(1) for m in _REFERENCE.finditer(text) if m.group(1)]


def _expand_text(text: str, where: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        if name not in env:
            raise MissingEnvVar(name, where)
        return env[name]

    return _REFERENCE.sub(sub, text)


def expand_env(obj: Any, where: str = "", env: Mapping[str, str] | None = None) -> Any:
    """Copy of ``obj`` (str, or lists/dicts of them) with every ``${NAME}`` replaced by ``env[NAME]``.

    ``env`` defaults to ``os.environ``; a missing variable raises :class:`MissingEnvVar`
    naming ``where`` (a dotted field path, extended by keys and indices below it).
    """
    env = os.environ if env is None else env
    if isinstance(obj, str):
        return _expand_text(obj, where, env) if "$" in obj else obj
    if isinstance(obj, Mapping):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), env) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(expand_env(v, f"{where}.{i}" if where else str(i), env) for i, v in enumerate(obj))
    return obj


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with the values of secret-looking keys replaced by ``"<redacted>"`` (module docstring)."""
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            keep = isinstance(value, str) and bool(_ONLY_REFERENCE.match(value))
            out[key] = REDACTED if is_secret_key(key) and value is not None and not keep else redact(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def secret_values(obj: Any, env: Mapping[str, str] | None = None) -> set[str]:
    """Values to keep out of text: those under secret-looking keys, and referenced env values (paths excepted)."""
    env = os.environ if env is None else env
    found: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, secret or is_secret_key(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif isinstance(value, str):
            for name in env_references(value):  # a referenced variable is a secret unless it is a path
                if name in env and (secret or os.sep not in env[name]):
                    found.add(env[name])
            if secret and not _ONLY_REFERENCE.match(value):
                found.add(value)
        elif secret and value is not None and not isinstance(value, bool):
            found.add(str(value))

    walk(obj, False)
    return {v for v in found if len(v) >= MIN_SCRUB}


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``values`` replaced by ``"<redacted>"`` (longest first)."""
    for value in sorted(set(values), key=len, reverse=True):
        if value:
            text = text.replace(value, REDACTED)
    return text
