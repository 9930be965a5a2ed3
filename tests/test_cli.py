"""mnistgen.cli: dataclass fields as argparse options and back (pure logic, no servers)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mnistgen.cli import add_dataclass_args, dataclass_from_args, parse_bool


@dataclass
class Inner:
    width: int = 8
    flags: tuple[bool, ...] = (False, True)


@dataclass
class Config:
    steps: int = 10
    rate: float = 0.5
    name: str = "base"
    out: Path = Path("out/x")
    enabled: bool = False
    limit: int | None = None
    batches: tuple[int, ...] = (1, 64)
    pair: tuple[float, float] = (0.5, 0.9)
    mode: str = "a"
    duration_s: float = 60.0
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_dataclass_args(p, Config, **kw)
    return p


def parse(argv: list[str], **kw) -> Config:
    return dataclass_from_args(Config, parser(**kw).parse_args(argv))


def test_no_options_gives_the_class_defaults():
    assert parse([]) == Config()


def test_types_from_string_annotations():
    cfg = parse(["--steps", "3", "--rate", "2e-4", "--name", "n", "--out", "a/b", "--enabled", "--limit", "7"])
    assert (cfg.steps, cfg.rate, cfg.name, cfg.out, cfg.enabled, cfg.limit) == (3, 2e-4, "n", Path("a/b"), True, 7)
    assert isinstance(cfg.out, Path)
    assert parse(["--no-enabled"]).enabled is False


def test_tuples_take_values_or_comma_lists():
    assert parse(["--batches", "1", "8", "256"]).batches == (1, 8, 256)
    assert parse(["--batches", "1,8", "256"]).batches == (1, 8, 256)
    assert parse(["--batches", "4", "--batches", "2,3"]).batches == (2, 3)  # the last use wins
    assert parse(["--pair", "0.1,0.2"]).pair == (0.1, 0.2)
    with pytest.raises(SystemExit):
        parse(["--pair", "0.1,0.2,0.3"])  # a fixed-length tuple
    with pytest.raises(argparse.ArgumentError):
        parse(["--batches", "1,x"])


def test_choices_for_scalars_and_tuple_items():
    assert parse(["--mode", "b"], choices={"mode": ("a", "b")}).mode == "b"
    with pytest.raises(argparse.ArgumentError):
        parse(["--mode", "c"], choices={"mode": ("a", "b")})
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parse(["--batches", "1,3"], choices={"batches": (1, 2)})


def test_names_exclude_and_help_text():
    p = parser(names={"duration_s": "--duration"}, exclude=("rate",), help={"name": "who"})
    text = p.format_help()
    assert "--duration DURATION" in text and "--duration-s" not in text and "--rate" not in text
    assert "who (default: base)" in text and "default: 1,64" in text and "default: out/x" in text
    assert "--inner" not in text  # nested dataclasses are left to the caller (see prefix=)
    assert dataclass_from_args(Config, p.parse_args(["--duration", "5"])).duration_s == 5.0


def test_base_keeps_what_was_not_given_and_overrides_win():
    base = Config(steps=99, name="chosen-later")
    cfg = dataclass_from_args(Config, parser(defaults=base).parse_args(["--rate", "1.5"]), base=base)
    assert (cfg.steps, cfg.name, cfg.rate) == (99, "chosen-later", 1.5)
    cfg = dataclass_from_args(Config, parser().parse_args(["--steps", "5"]), steps=7)
    assert cfg.steps == 7
    assert "default: 99" in parser(defaults=base).format_help()


def test_nested_config_with_a_prefix():
    p = parser()
    add_dataclass_args(p, Inner, prefix="inner_")
    a = p.parse_args(["--inner-width", "4", "--inner-flags", "1,no", "--steps", "2"])
    cfg = dataclass_from_args(Config, a, inner=dataclass_from_args(Inner, a, prefix="inner_"))
    assert cfg.steps == 2 and cfg.inner == Inner(width=4, flags=(True, False))


def test_validation_errors_raise_or_become_usage_errors(capsys):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        parse(["--steps", "0"])
    p = parser()
    with pytest.raises(SystemExit) as e:
        dataclass_from_args(Config, p.parse_args(["--steps", "0"]), parser=p)
    assert e.value.code == 2 and "steps must be >= 1" in capsys.readouterr().err


def test_required_fields_and_unknown_names():
    @dataclass
    class Needs:
        url: str
        port: int = 1

    p = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_args(p, Needs)
    assert dataclass_from_args(Needs, p.parse_args(["--url", "u"])) == Needs("u")
    with pytest.raises(SystemExit):
        p.parse_args([])
    with pytest.raises(ValueError, match="no fields"):
        add_dataclass_args(argparse.ArgumentParser(), Needs, exclude=("nope",))


def test_parse_bool():
    assert [parse_bool(s) for s in ("1", "True", "yes", "on", "0", "false", "No", "off")] == [True] * 4 + [False] * 4
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bool("maybe")


def test_percent_in_defaults_does_not_break_help():
    @dataclass
    class Fmt:
        pattern: str = "%d-%s"

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Fmt)
    assert "default: %d-%s" in p.format_help()
