"""Config I/O for any nested dataclass: plain dicts and YAML in, validated instances out, and the CLI help text.

Contract: a config is built as defaults <- YAML file <- dotted CLI overrides, then checked once by ``from_dict``.
Every error is a ``ConfigError`` whose message starts with the full dotted key and says how to fix it.
The help text comes from the dataclasses' attribute docstrings, so nothing is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from expertrl.config import ConfigError

_MISSING = dataclasses.MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal on the line after each field (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL or by exec: no source, so no docs
            continue
        body = ast.parse(source).body[0].body
        for stmt, after in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for default_factory), or MISSING."""
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return f.default


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# ---------------------------------------------------------------------------------------------------------------
# dataclass -> plain data


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-serialisable dict of a dataclass instance (nested dataclasses -> dicts, tuples -> lists)."""
    assert dataclasses.is_dataclass(cfg) and not isinstance(cfg, type), f"expected a dataclass instance, got {cfg!r}"
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML, fields in declaration order; ``load_config`` reads it back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping raises ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {_show(data)}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# plain data -> validated dataclass


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build a (nested) dataclass from a plain dict, checking keys and types against the annotations.

    Keys missing from ``data`` keep their defaults. A nested section that is only partly given keeps the other
    values of that field's own default (e.g. ``SFTConfig.optim``'s lr=3e-3), not those of the class.

    Args:
        cls: the dataclass to build.
        data: its values, as loaded from YAML; nested dataclasses as nested dicts.
        prefix: dotted path of ``cls`` inside the root config (``"sft.optim."``), used in error messages.
    """
    assert _is_dataclass_type(cls), f"expected a dataclass type, got {cls!r}"
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: expected a mapping with keys {_names(cls)}, got {_show(data)}")
    fields = {f.name: f for f in _fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(cls, key, prefix))
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        tp = hints[name]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            default = _default(fields[name])
            if dataclasses.is_dataclass(default):  # keep the field's own default sub-values
                value = _merge(tp, to_dict(default), value)
            kwargs[name] = from_dict(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    missing = [n for n, f in fields.items() if n not in kwargs and _default(f) is _MISSING]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(prefix + n for n in missing)}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_full_key(str(e), prefix)) from None
    for w in caught:  # a section's warning names its full key too ('sft.optim.lr: ...'), reported at the caller
        warnings.warn(_full_key(str(w.message), prefix), w.category, stacklevel=2)
    return built


def _full_key(msg: str, prefix: str) -> str:
    """'optim.lr: ...' raised by OptimConfig inside 'sft.optim.' -> 'sft.optim.lr: ...' (config.py knows one path)."""
    parts = prefix.rstrip(".").split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:]) + "."
        if msg.startswith(tail):
            return prefix + msg[len(tail) :]
    return msg


def _unknown_key(cls: type, key: str, prefix: str) -> str:
    valid = [f.name for f in _fields(cls)]
    msg = f"unknown key {prefix + str(key)!r}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        msg += f"; did you mean {prefix + close[0]!r}?"
    section = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
    return f"{msg} Valid keys of {section}: {', '.join(valid)}"


def _merge(cls: type, base: dict, over: dict) -> dict:
    """``over`` laid on ``base``: recurses into nested dataclass sections only, so a dict-valued field is replaced."""
    merged = dict(base)
    hints = _hints(cls)
    for name, value in over.items():
        tp = hints.get(name)
        if _is_dataclass_type(tp) and isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge(tp, merged[name], value)
        else:
            merged[name] = value
    return merged


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp, article=True)}, got {_show(value)}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        choices = ", ".join(repr(a) for a in args)
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: expected one of {choices}, got {_show(value)}{hint}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key + ".")  # raises for a non-mapping
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            if not args:
                return dict(value)
            return {
                _coerce(k, args[0], f"{key}[{k!r}]"): _coerce(v, args[1], f"{key}[{k!r}]") for k, v in value.items()
            }
    elif origin in (tuple, list):
        if origin is list and args and not isinstance(value, (list, tuple, dict)) and value is not None:
            return [_coerce(value, args[0], f"{key}[0]")]  # one value for a list: --report_to tensorboard
        if isinstance(value, (list, tuple)):
            if origin is list:
                return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if not args:
                return tuple(value)
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    else:
        raise TypeError(f"{key}: configio does not support the annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp, article=True)}, got {_show(value)}")


def _type_name(tp: Any, article: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a, article) for a in args if a is not type(None)]
        return " or ".join(names + (["None"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            name = f"list of {_type_name(args[0])}"
        elif args:
            name = f"list [{', '.join(_type_name(a) for a in args)}]"
        else:
            name = "list"
        return ("a " if article else "") + name
    if origin is dict or tp is dict:
        return ("a " if article else "") + "mapping"
    name = tp.__name__ if isinstance(tp, type) else str(tp)
    if article:
        return ("an " if name[0] in "aeiou" else "a ") + name
    return name


# ---------------------------------------------------------------------------------------------------------------
# command line


def parse_overrides(args: list[str]) -> dict:
    """Dotted CLI overrides -> a nested dict; values are parsed as YAML (``8`` -> int, ``null`` -> None).

    Accepts ``--rollout.group_size 8`` and ``--rollout.group_size=8``; a later flag wins over an earlier one.
    """
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        if "=" in arg:
            flag, text = arg.split("=", 1)
            i += 1
        else:
            flag = arg
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{flag}: missing value (write {flag} VALUE or {flag}=VALUE)")
            text = args[i + 1]
            i += 2
        path = flag[2:].split(".")
        if not all(path):
            raise ConfigError(f"{flag}: malformed key; overrides look like --section.key VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag}: cannot parse value {text!r} as YAML: {getattr(e, 'problem', e)}") from None
        node = out
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag}: {'.'.join(path[: depth + 1])} was already set to a value, not a section")
        node[path[-1]] = value
    return out


def load_config(cls: type, config_path: str | Path | None, overrides: list[str]) -> Any:
    """Defaults <- YAML file (if any) <- dotted CLI overrides, validated by ``from_dict``."""
    data = load_yaml(config_path) if config_path is not None else {}
    return from_dict(cls, _merge(cls, data, parse_overrides(overrides)))


def format_help(cls: type) -> str:
    """Every dotted field of a config with its type, default and docstring, for ``--help``."""
    lines: list[str] = []
    _help_lines(cls, cls(), "", lines)
    return "\n".join(lines)


def _help_lines(cls: type, default: Any, prefix: str, lines: list[str]) -> None:
    docs, hints = field_docs(cls), _hints(cls)
    flat = [f for f in _fields(cls) if not _is_dataclass_type(hints[f.name])]
    nested = [f for f in _fields(cls) if _is_dataclass_type(hints[f.name])]
    for f in flat:  # a section's own scalars first, then its subsections
        value = getattr(default, f.name)
        shown = "null" if value is None else yaml.safe_dump(_plain(value), default_flow_style=True).strip()
        shown = shown.removesuffix("\n...")  # safe_dump ends a bare scalar with a document-end marker
        lines.append(f"  --{prefix}{f.name} {_metavar(hints[f.name])}  (default: {shown})")
        if f.name in docs:
            lines.extend("      " + line for line in textwrap.wrap(docs[f.name], 110, break_on_hyphens=False))
    for f in nested:
        lines.append("")
        lines.append(f"{prefix}{f.name}: {docs.get(f.name, '')}".rstrip())
        _help_lines(hints[f.name], getattr(default, f.name), prefix + f.name + ".", lines)


def _metavar(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_metavar(a) for a in args if a is not type(None)) + ("|null" if type(None) in args else "")
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_metavar(args[0])}, ...]"
        return "[" + ", ".join(_metavar(a) for a in args) + "]" if args else "LIST"
    if origin is dict or tp is dict:
        return "{KEY: VALUE}"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, str(tp))


def _names(cls: type) -> str:
    return ", ".join(f.name for f in _fields(cls))
