"""Options generated from a configuration dataclass: flags, types, choices, help, and only given options."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from sparseapps.core.options import add_options, collect, parse_config


@dataclass(frozen=True)
class Tiny:
    steps: int = field(default=100, metadata={"help": "training steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    fast: bool = field(default=False, metadata={"help": "go fast"})
    model: Literal["mlp", "cnn"] = field(default="mlp", metadata={"help": "backbone"})
    widths: tuple[int, ...] = field(default=(64, 64), metadata={"help": "hidden widths"})
    workers: int | None = field(default=None, metadata={"help": "worker count"})
    name: str = "run"


def parser_of(**options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiny")
    add_options(parser, Tiny, **options)
    return parser


def test_one_flag_per_field_typed_by_its_hint() -> None:
    parser = parser_of()
    flags = [a.option_strings[0] for a in parser._actions[1:]]
    assert flags == ["--steps", "--lr", "--fast", "--model", "--widths", "--workers", "--name"]
    args = parser.parse_args(
        ["--steps", "5", "--lr", "0.5", "--fast", "--model", "cnn", "--widths", "8", "16", "--workers", "3"]
    )
    assert collect(args, Tiny) == {
        "steps": 5, "lr": 0.5, "fast": True, "model": "cnn", "widths": (8, 16), "workers": 3,
    }  # fmt: skip
    assert collect(parser.parse_args(["--no-fast"]), Tiny) == {"fast": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "1.5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "rnn"])  # a Literal's values are the choices


def test_only_given_options_are_collected() -> None:
    parser = parser_of()
    assert collect(parser.parse_args([]), Tiny) == {}
    args = parser.parse_args(["--name", "x", "--steps", "7"])
    assert collect(args, Tiny) == {"steps": 7, "name": "x"}
    assert collect(args, Tiny, ["steps"]) == {"steps": 7}
    assert Tiny(**collect(args, Tiny)) == Tiny(steps=7, name="x")
    with pytest.raises(ValueError, match="'seed' is not a field of Tiny"):
        collect(args, Tiny, ["seed"])


def test_help_is_the_fields_with_their_defaults() -> None:
    actions = parser_of()._option_string_actions
    assert actions["--steps"].help == "training steps (default: 100)"
    assert actions["--widths"].help == "hidden widths (default: 64 64)"
    assert actions["--workers"].help == "worker count (default: None)"
    assert actions["--model"].choices == ("mlp", "cnn")
    assert actions["--no-fast"] is actions["--fast"]
    actions = parser_of(
        help={"steps": "optimizer steps"}, defaults={"steps": "the preset's"}
    )._option_string_actions
    assert actions["--steps"].help == "optimizer steps (default: the preset's)"


def test_names_exclude_choices_types_and_deprecated_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    def widths(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(","))

    parser = argparse.ArgumentParser(prog="tiny")
    added = add_options(
        parser,
        Tiny,
        names=["name", "widths", "steps"],
        exclude=["steps"],
        choices={"name": ["run", "test"]},
        types={"widths": widths},
        deprecated={"--label": "name"},
    )
    assert added == ["name", "widths"]
    assert "--steps" not in parser._option_string_actions and "--label" not in parser.format_help()
    args = parser.parse_args(["--widths", "4,5", "--label", "test"])
    assert collect(args, Tiny) == {"name": "test", "widths": (4, 5)}
    assert capsys.readouterr().err == "note: --label is deprecated; use --name\n"
    with pytest.raises(SystemExit):
        parser.parse_args(["--label", "other"])  # an alias has the field's choices


def test_refuses_unknown_fields_and_types_without_an_option() -> None:
    with pytest.raises(ValueError, match="'seed' is not a field of Tiny"):
        parser_of(names=["seed"])
    with pytest.raises(ValueError, match="--old is an alias of 'steps', which is not an option added here"):
        parser_of(exclude=["steps"], deprecated={"--old": "steps"})

    @dataclass
    class Nested:
        pairs: tuple[tuple[int, float], ...] = ()

    with pytest.raises(TypeError, match="field 'pairs': no option for the type"):
        add_options(argparse.ArgumentParser(), Nested)
    parser = argparse.ArgumentParser()
    add_options(parser, Nested, types={"pairs": lambda text: ((int(text), 1.0),)})
    assert collect(parser.parse_args(["--pairs", "3"]), Nested) == {"pairs": ((3, 1.0),)}


def test_parse_config_applies_quick_then_the_options_and_keeps_underscore_spellings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @dataclass(frozen=True)
    class Bench:
        batch_size: int = 256
        skip_inference: bool = False
        widths: tuple[int, ...] = (64,)
        quick: bool = False

    quick = {"batch_size": 8, "widths": (4, 4)}
    assert parse_config(Bench, [], quick=quick) == Bench()
    assert parse_config(Bench, ["--quick"], quick=quick) == Bench(batch_size=8, widths=(4, 4), quick=True)
    got = parse_config(Bench, ["--quick", "--batch_size", "16", "--skip_inference"], quick=quick)
    assert got == Bench(batch_size=16, skip_inference=True, widths=(4, 4), quick=True)
    err = capsys.readouterr().err
    assert "--batch_size is deprecated; use --batch-size" in err and "use --skip-inference" in err
