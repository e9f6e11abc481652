"""Tasks and unlearning methods by name: a built-in's short name, or ``package.module:Class`` for a user's own.

A user's task or method needs no edit of rr-ray: name its class in config (``task.name: mypkg.tasks:MyTask``,
``compare.methods: [reveal_release, mypkg.methods:MyMethod]``). Registries hold import strings, so naming a
plugin imports nothing until it is built (config validation stays light and torch-free).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

TASKS = {
    "code": "rr_ray.tasks.code:CodeTask",
    "toxicity": "rr_ray.tasks.toxicity:ToxicityTask",
    "ner": "rr_ray.tasks.ner:NerTask",
    "custom": "rr_ray.tasks.custom:CustomTask",
}
METHODS = {
    "reveal_release": "rr_ray.methods.reveal_release:RevealRelease",
    "pem_external": "rr_ray.methods.pem_external:PemExternal",
    "ext_sub": "rr_ray.methods.ext_sub:ExtSub",
    "dpo": "rr_ray.methods.dpo:Dpo",
    "npo": "rr_ray.methods.gradient:Npo",
    "graddiff": "rr_ray.methods.gradient:GradDiff",
}
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_spec(name: str) -> bool:
    """Whether ``name`` is an import string (``package.module:Class``) rather than a built-in's name."""
    return bool(_SPEC.match(name))


def check_name(kind: str, registry: dict[str, str], name: str) -> str:
    """``name`` if it is a built-in or well-formed import string; ValueError listing both forms otherwise."""
    if name in registry or is_spec(name):
        return name
    raise ValueError(f"unknown {kind} {name!r}: use one of {sorted(registry)} or 'package.module:Class'")


def load(kind: str, registry: dict[str, str], name: str) -> Any:
    """The class ``name`` stands for, imported now; one-line errors for a missing module or attribute."""
    spec = registry.get(name, name)
    check_name(kind, registry, name)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{kind} {name!r}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{kind} {name!r}: module {module_name!r} has no {attr!r}") from None
