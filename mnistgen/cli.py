"""Command-line options and environment variables from a @dataclass config: one `--field-name` per field.

    add_dataclass_args(p, SoakConfig, names={"duration_s": "--duration"}, exclude=("triton_pid",))
    cfg = dataclass_from_args(SoakConfig, p.parse_args(argv), parser=p, env_prefix="MNISTGEN_")

Types: int, float, str, Path, bool (`--flag/--no-flag`), `X | None`, `tuple[X, ...]` and fixed tuples (values may be
comma-separated: `--batches 1 64` = `--batches 1,64`). An option not given is None in the namespace: the field keeps
its value from `base`, else from the environment (`<env_prefix><FIELD>`), else the class default. A field declared
with repr=False (a secret) never shows its default. Standard library only: the serving CLIs import it too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """"1/true/yes/on" -> True, "0/false/no/off" -> False (case-insensitive); anything else is an error."""
    s = text.strip().lower()
    if s in _TRUE + _FALSE:
        return s in _TRUE
    raise argparse.ArgumentTypeError(f"expected a boolean (one of {_TRUE + _FALSE}), got {text!r}")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar_parser(tp: Any, name: str) -> Callable[[str], Any]:
    if tp is bool:
        return parse_bool
    if isinstance(tp, type) and issubclass(tp, (int, float, str, Path)):
        return tp
    raise TypeError(f"{name}: no command-line conversion for type {tp!r}")


class _TupleAction(argparse.Action):
    """nargs="+" whose tokens (each parsed to a tuple: "1,64" -> (1, 64)) are joined into one tuple; last use wins."""

    def __init__(self, *args, length: int | None = None, **kw):
        self.length = length
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        items = tuple(v for token in values for v in token)
        if self.length is not None and len(items) != self.length:
            parser.error(f"argument {option_string}: expected {self.length} values, got {len(items)}")
        setattr(namespace, self.dest, items)


def _tuple_parser(item: Callable[[str], Any], choices: Sequence | None) -> Callable[[str], tuple]:
    def parse(token: str) -> tuple:
        out = tuple(item(part) for part in (p.strip() for p in token.split(",")) if part)
        bad = [v for v in out if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice {bad[0]!r} (choose from {', '.join(map(str, choices))})")
        return out

    parse.__name__ = item.__name__  # argparse names the type in its "invalid <type> value" message
    return parse


def _field_kwargs(name: str, tp: Any, choices: Sequence | None) -> dict:
    """argparse keyword arguments (type, nargs, action, choices, metavar) for one field's annotation."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if len({args[0]} if variadic else set(args)) != 1:
            raise TypeError(f"{name}: tuples of mixed types are not supported ({tp!r})")
        kw = dict(nargs="+", action=_TupleAction, type=_tuple_parser(_scalar_parser(args[0], name), choices))
        return kw if variadic else kw | {"length": len(args)}
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction)
    kw = dict(type=_scalar_parser(tp, name))
    if choices is not None:
        kw.update(choices=choices, metavar="{" + ",".join(map(str, choices)) + "}")
    return kw


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(empty)"
    return '""' if value == "" else str(value)


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, defaults: Any = None,
                       prefix: str = "", exclude: Iterable[str] = (), choices: Mapping[str, Sequence] | None = None,
                       names: Mapping[str, str] | None = None,
                       help: Mapping[str, str] | None = None) -> None:  # noqa: A002  (argparse's word)
    """One option per field of `cls` (except `exclude` and nested dataclasses): `--<prefix><field>` ("_" as "-";
    `names` maps a field to another option string), dest `<prefix><field>`. `defaults`: an instance whose values the
    help shows; `choices` per field (per item for tuples); `help` text per field, "(default: X)" added. A field
    without a default is a required option."""
    hints = typing.get_type_hints(cls)
    excluded, choices, names, help = set(exclude), dict(choices or {}), dict(names or {}), dict(help or {})
    unknown = (excluded | set(choices) | set(names) | set(help)) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if f.name in excluded or not f.init or dataclasses.is_dataclass(_unwrap_optional(hints[f.name])):
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        flag = names.get(f.name, "--" + (prefix + f.name).replace("_", "-"))
        shown = ("required" if default is dataclasses.MISSING else
                 "default: hidden" if not f.repr else f"default: {_shown(default)}")
        text = help[f.name] if f.name in help and default is None else (
            f"{help[f.name]} ({shown})" if f.name in help else shown)  # None: the help says what "not given" means
        kw = _field_kwargs(f.name, hints[f.name], choices.get(f.name))
        if kw.get("action") is _TupleAction and f.name in choices:
            text += f"; each one of: {', '.join(map(str, choices[f.name]))}"
        if kw.get("action") in (None, _TupleAction):
            kw.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag, dest=prefix + f.name, default=None, required=default is dataclasses.MISSING,
                            help=text.replace("%", "%%"), **kw)


def env_values(cls: type, env_prefix: str, environ: Mapping[str, str] | None = None) -> dict:
    """{field: value} of the fields set as environment variables `<env_prefix><FIELD>`, converted like the option;
    ValueError naming the variable for a value that does not convert."""
    environ = os.environ if environ is None else environ
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        raw = environ.get(env_prefix + f.name.upper())
        if raw is None or not f.init or dataclasses.is_dataclass(_unwrap_optional(hints[f.name])):
            continue
        kw = _field_kwargs(f.name, hints[f.name], None)
        try:
            out[f.name] = parse_bool(raw) if kw.get("action") is argparse.BooleanOptionalAction else kw["type"](raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{env_prefix}{f.name.upper()}={raw!r} is not a valid {f.name}: {e}") from None
    return out


def dataclass_from_args(cls: type, namespace: argparse.Namespace, prefix: str = "", base: Any = None,
                        parser: argparse.ArgumentParser | None = None, env_prefix: str = "",
                        environ: Mapping[str, str] | None = None, **overrides):
    """An instance of `cls`: `overrides`, over the options given (not None in `namespace`), over the environment
    (with `env_prefix`), over `base` (default: the class defaults). With `parser`, a ValueError (a bad environment
    value, the dataclass's own validation) becomes `parser.error` (usage + message, exit status 2)."""
    try:
        given = env_values(cls, env_prefix, environ) if env_prefix else {}
        given.update({f.name: v for f in dataclasses.fields(cls)
                      if f.init and (v := getattr(namespace, prefix + f.name, None)) is not None})
        given.update(overrides)
        return cls(**given) if base is None else dataclasses.replace(base, **given)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


USER_ERRORS = (ValueError, FileNotFoundError, KeyError)  # what a report command answers with "error: ..." and exit 2


def exit_code(action: Callable[[], object]) -> int:
    """Run a command's body: 0 when it returns, 2 with `error: <message>` on stderr for USER_ERRORS (bad options, a
    missing checkpoint or JSON); anything else propagates with its traceback."""
    try:
        action()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
