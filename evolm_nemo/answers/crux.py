"""CRUXEval answers: Python literals (``evolm``: quotes stripped, ``==``; ``strict``: quotes kept, ``True`` is not
``1``)."""

from __future__ import annotations

import ast

def _unwrap_text(s: str) -> str:
    s = s.strip()
    if s.startswith("\\text{") and s.endswith("}"):
        return s[len("\\text{") : -1]
    return s


def _literal_or_str(s: str):
    try:
        return ast.literal_eval(s)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM stop the command, as anywhere else
        raise
    except BaseException:  # SyntaxError, ValueError, MemoryError, RecursionError, ... (the reference: bare except)
        return s


def _crux_equiv_evolm(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        x = _unwrap_text(x)
        if x.startswith("'") and x.endswith("'"):
            x = x[1:-1]
        return x

    try:
        return bool(_literal_or_str(norm(a)) == _literal_or_str(norm(b)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return False


def _same_value(x, y, depth: int = 0) -> bool:
    """Equality of Python literal values that keeps bool apart from int (``True`` is not ``1``) and str apart from
    everything else; containers compare element-wise with the same rule."""
    if depth > 100:
        return False
    if isinstance(x, bool) or isinstance(y, bool):
        return type(x) is type(y) and x == y
    if isinstance(x, (int, float, complex)) and isinstance(y, (int, float, complex)):
        return x == y
    if type(x) is not type(y):
        return False
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same_value(u, v, depth + 1) for u, v in zip(x, y))
    if isinstance(x, dict):
        if len(x) != len(y) or set(x) != set(y):
            return False
        return all(_same_value(x[k], y[k], depth + 1) for k in x)
    return x == y


def _crux_value_strict(s: str):
    s = _unwrap_text(s)
    for candidate in (s, s[:-1].rstrip() if s.endswith(".") else None):
        if candidate:
            try:
                return ast.literal_eval(candidate)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                pass
    return s  # an unquoted string answer stands for itself


def _crux_equiv_strict(a: str, b: str) -> bool:
    try:
        return _same_value(_crux_value_strict(a), _crux_value_strict(b))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        return False
