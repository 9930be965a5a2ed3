"""Command-line options from a @dataclass config: one `--field-name` per field, typed from its annotation.

    p = argparse.ArgumentParser()
    add_dataclass_args(p, SoakConfig, names={"duration_s": "--duration"}, exclude=("triton_pid",))
    cfg = dataclass_from_args(SoakConfig, p.parse_args(argv))

Types: int, float, str, Path, bool (`--flag/--no-flag`), `X | None` (as X), `tuple[X, ...]` and fixed tuples
(one or more values, each may be comma-separated: `--batches 1 64` = `--batches 1,64`); string annotations
(`from __future__ import annotations`) are resolved with typing.get_type_hints.

Every option's argparse default is None, meaning "not given": dataclass_from_args keeps the field's value from
`base` (or the class default) for those, so a config chosen after parsing (train_gan's --config) can be
overridden by exactly the options given. The help text names the default (`default: X`).
Standard library only (no torch): the serving and load-test CLIs import it too.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["add_dataclass_args", "dataclass_from_args", "parse_bool"]

_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """"1/true/yes/on" -> True, "0/false/no/off" -> False (case-insensitive); anything else is an error."""
    s = text.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (one of {_TRUE + _FALSE}), got {text!r}")


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` / Optional[X] -> X (other unions are left as they are)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar_parser(tp: Any, name: str) -> Callable[[str], Any]:
    if tp is bool:
        return parse_bool
    if tp in (int, float, str, Path):
        return tp
    if isinstance(tp, type) and issubclass(tp, (int, float, str, Path)):
        return tp
    raise TypeError(f"{name}: no command-line conversion for type {tp!r}")


def _format_default(value: Any) -> str:
    if value == "":
        return '""'
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "(empty)"
    return str(value)


class _TupleAction(argparse.Action):
    """nargs="+" whose converted tokens (each a tuple: "1,64" -> (1, 64)) are joined into one tuple; last use wins."""

    def __init__(self, *args, length: int | None = None, **kw):
        self.length = length
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        items = tuple(v for token in values for v in token)
        if self.length is not None and len(items) != self.length:
            parser.error(f"argument {option_string}: expected {self.length} values, got {len(items)}")
        setattr(namespace, self.dest, items)


def _tuple_item_parser(item: Callable[[str], Any], choices: Sequence | None, name: str) -> Callable[[str], tuple]:
    def parse(token: str) -> tuple:
        out = []
        for part in (p.strip() for p in token.split(",")):
            if not part:
                continue
            v = item(part)
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {v!r} (choose from {', '.join(map(str, choices))})")
            out.append(v)
        return tuple(out)

    parse.__name__ = name  # argparse names the type in its "invalid <type> value" message
    return parse


def _field_kwargs(name: str, tp: Any, choices: Sequence | None) -> dict:
    """argparse keyword arguments (type, nargs, action, choices, metavar) for one field's annotation."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        variadic = len(args) == 2 and args[1] is Ellipsis
        item_types = {args[0]} if variadic else set(args)
        if len(item_types) != 1:
            raise TypeError(f"{name}: tuples of mixed types are not supported ({tp!r})")
        item = _scalar_parser(item_types.pop(), name)
        kw = dict(nargs="+", action=_TupleAction, type=_tuple_item_parser(item, choices, item.__name__))
        if not variadic:
            kw["length"] = len(args)
        return kw
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction)
    kw = dict(type=_scalar_parser(tp, name))
    if choices is not None:
        kw.update(choices=choices, metavar="{" + ",".join(map(str, choices)) + "}")
    return kw


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    defaults: Any = None,
    prefix: str = "",
    exclude: Iterable[str] = (),
    choices: Mapping[str, Sequence] | None = None,
    names: Mapping[str, str | Sequence[str]] | None = None,
    help: Mapping[str, str] | None = None,  # noqa: A002  (argparse's word)
) -> None:
    """Add one option per field of the dataclass `cls` (except `exclude` and nested dataclasses).

    - the option is `--<prefix><field>` with "_" as "-" (`names` maps a field to other option strings);
      its dest is `<prefix><field>`, which dataclass_from_args reads back
    - `defaults`: an instance whose values the help text shows (default: the class defaults)
    - `choices`: allowed values per field (for a tuple field, per item); `help`: text per field, to which
      "(default: X)" is added
    - a field without a default (and no `defaults` instance) is a required option
    """
    hints = typing.get_type_hints(cls)
    excluded, choices, names, help = set(exclude), dict(choices or {}), dict(names or {}), dict(help or {})
    unknown = (excluded | set(choices) | set(names) | set(help)) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in excluded or not f.init or dataclasses.is_dataclass(_unwrap_optional(tp)):
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        flags = names.get(f.name, "--" + (prefix + f.name).replace("_", "-"))
        flags = [flags] if isinstance(flags, str) else list(flags)
        shown = "required" if default is dataclasses.MISSING else f"default: {_format_default(default)}"
        if f.name not in help:
            text = shown
        elif default is None:  # the help text says what "not given" means
            text = help[f.name]
        else:
            text = f"{help[f.name]} ({shown})"
        kw = _field_kwargs(f.name, tp, choices.get(f.name))
        if kw.get("action") is _TupleAction and f.name in choices:
            text += f"; each one of: {', '.join(map(str, choices[f.name]))}"
        if kw.get("action") in (None, _TupleAction):
            kw.setdefault("metavar", flags[-1].lstrip("-").replace("-", "_").upper())
        parser.add_argument(*flags, dest=prefix + f.name, default=None, required=default is dataclasses.MISSING,
                            help=text.replace("%", "%%"), **kw)


def dataclass_from_args(cls: type, namespace: argparse.Namespace, prefix: str = "", base: Any = None,
                        parser: argparse.ArgumentParser | None = None, **overrides):
    """An instance of `cls`: the options given (not None in `namespace`) over `base` (default: the class defaults).

    `overrides` (e.g. a nested config built from its own prefix) win over both. The dataclass validates as usual;
    with `parser`, a ValueError from that validation becomes `parser.error` (usage + message, exit status 2).
    """
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(namespace, prefix + f.name, None)
        if value is not None and f.init:
            given[f.name] = value
    given.update(overrides)
    try:
        return cls(**given) if base is None else dataclasses.replace(base, **given)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


USER_ERRORS = (ValueError, FileNotFoundError, KeyError)  # what a report command answers with "error: ..." and exit 2


def exit_code(action: Callable[[], object]) -> int:
    """Run a command's body: 0 when it returns, 2 with `error: <message>` on stderr for USER_ERRORS (bad options, a
    missing checkpoint or JSON), anything else propagates with its traceback."""
    import sys

    try:
        action()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
