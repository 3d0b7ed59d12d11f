"""User code named in a config as 'package.module:function' (reward functions, pairwise judges).

Resolved when the config loads, so a missing module, a syntax error in it or a missing function is a
one-line error naming the field before any model loads.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable


def import_callable(spec: str) -> Callable:
    """'package.module:function' -> the function; errors name the spec (and file and line of a syntax error)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise ValueError(f"{spec!r}: syntax error in {err.filename}, line {err.lineno}: {err.msg}") from None
    except ImportError as err:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - the module's own top-level code failed
        raise ValueError(f"{spec!r}: importing module {module_name!r} raised {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn
