"""``MODULE:ATTR`` references to a user's code (a model factory, a dataset loader), resolved the
same way on the server and on phones. Torch-free: importing this module imports nothing heavy."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

BUILTIN_MODELS = ("mlp", "cnn", "mobilenet")  # export.models.MODEL_NAMES, without importing torch


def check_model_name(name: str, flag: str = "--model") -> None:
    """ValueError unless ``name`` is a built-in model or has the MODULE:ATTR form (imports nothing)."""
    if name not in BUILTIN_MODELS and not is_ref(name):
        raise ValueError(f"{flag} {name}: unknown model; give {', '.join(BUILTIN_MODELS)} or MODULE:ATTR "
                         "(a callable returning a torch.nn.Module)")


def is_ref(text: str) -> bool:
    """``MODULE:ATTR``: a dotted module path and a dotted attribute path, both made of identifiers."""
    module, sep, attr = text.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and all(
        p.isidentifier() for p in attr.split("."))


def resolve_ref(text: str, flag: str) -> Callable[..., Any]:
    """The callable ``text`` (``MODULE:ATTR``) names. ValueError naming ``flag`` when the module cannot
    be imported, has no such attribute, or the attribute is not callable."""
    if not is_ref(text):
        raise ValueError(f"{flag} {text}: not MODULE:ATTR (e.g. mypackage.task:make_model)")
    module_name, _, attr = text.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{flag} {text}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {text}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{flag} {text}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def call_with(fn: Callable[..., Any], **offered: Any) -> Any:
    """Call ``fn`` with those of ``offered`` its signature names (by keyword); a factory that takes
    no arguments is called with none."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**offered)
    return fn(**{k: v for k, v in offered.items() if k in params})


def ref_of(obj: Any, what: str) -> str:
    """``MODULE:ATTR`` of a module-level callable (the Python API passes objects; the server and the
    phones import them by name). ValueError for a lambda, a nested function or anything not importable."""
    if isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    ref = f"{module}:{qualname}"
    if not module or not qualname or not is_ref(ref):
        raise ValueError(f"{what}: {obj!r} is not a module-level function or class; define it at the top of "
                         "a module (the server and the phones import it by MODULE:ATTR)")
    try:
        found = resolve_ref(ref, what)
    except ValueError:
        found = None
    if found is not obj:
        raise ValueError(f"{what}: {ref} does not import back to {obj!r}; define it at the top of a module")
    return ref
