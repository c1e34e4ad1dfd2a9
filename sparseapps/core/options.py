"""Command-line options generated from configuration dataclasses: one ``--flag-name`` per field, the field's type,
help string and default, as every ``sparseapps`` command names them.

:func:`add_options` adds the options of a dataclass's fields to an :mod:`argparse` parser (or argument group);
:func:`collect` returns the fields the user gave, ready for the dataclass (or its ``replace``). Every option's
argparse default is ``None``, so that a field not given keeps the dataclass's (or the command's) default; the help
shows that default. The type comes from the field's type hint: ``bool`` is ``--flag / --no-flag``, a ``Literal`` a
choice, ``tuple[X, ...]`` one or more values (``nargs="+"``), ``int``, ``float`` and ``str`` themselves, and
``X | None`` is ``X``; ``types`` gives a parser of one string for any other field (or another syntax).

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> from typing import Literal
    >>> @dataclass(frozen=True)
    ... class Run:
    ...     steps: int = field(default=100, metadata={"help": "training steps"})
    ...     widths: tuple[int, ...] = (64, 64)
    ...     model: Literal["mlp", "cnn"] = "mlp"
    ...     fast: bool = False
    >>> parser = argparse.ArgumentParser(prog="run")
    >>> add_options(parser, Run)
    ['steps', 'widths', 'model', 'fast']
    >>> args = parser.parse_args(["--steps", "5", "--widths", "8", "8", "--fast"])
    >>> collect(args, Run)
    {'steps': 5, 'widths': (8, 8), 'fast': True}
    >>> Run(**collect(args, Run))
    Run(steps=5, widths=(8, 8), model='mlp', fast=True)
    >>> parser._option_string_actions["--steps"].help
    'training steps (default: 100)'
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import UnionType
from typing import Any, Literal

__all__ = ["add_options", "collect", "parse_config", "torch_threads"]


class _DeprecatedAlias(argparse.Action):
    """An old option name: stores its value under the field's name and prints a one-line note."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option: str | None = None,
    ) -> None:
        print(f"note: {option} is deprecated; use {_flag(self.dest)}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _without_none(hint: Any) -> Any:
    """``X`` of ``X | None`` (or ``Optional[X]``); other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def _scalar(name: str, hint: Any) -> dict[str, Any]:
    """``type`` (and ``choices`` for a ``Literal``) of one value of the hint ``hint``."""
    hint = _without_none(hint)
    if typing.get_origin(hint) is Literal:
        values = typing.get_args(hint)
        return {"type": type(values[0]), "choices": values}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"field {name!r}: no option for the type {hint!r}; give a parser in types")


def _argument(name: str, hint: Any, parse: Callable[[str], Any] | None) -> dict[str, Any]:
    """The :meth:`~argparse.ArgumentParser.add_argument` keywords of a field of type ``hint``."""
    hint = _without_none(hint)
    if parse is not None:
        return {"type": parse}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if len(items) != 2 or items[1] is not Ellipsis:
            raise TypeError(f"field {name!r}: no option for the type {hint!r}; give a parser in types")
        return {"nargs": "+", **_scalar(name, items[0])}
    return _scalar(name, hint)


def _default_text(item: dataclasses.Field[Any], shown: Mapping[str, Any], nargs: bool) -> str:
    if item.name in shown:
        value = shown[item.name]
    elif item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return ""
    if nargs and isinstance(value, tuple):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    *,
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    choices: Mapping[str, Iterable[Any]] | None = None,
    types: Mapping[str, Callable[[str], Any]] | None = None,
    help: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    deprecated: Mapping[str, str] | None = None,
) -> list[str]:
    """Adds one ``--flag-name`` option per field of the dataclass ``config_class`` to ``parser``.

    Args:
        parser: an :class:`argparse.ArgumentParser` or an argument group of one.
        config_class: the dataclass; its type hints type the options.
        names: the fields to add, in this order (default: all of them, in the class's order).
        exclude: fields not to add.
        choices: allowed values per field (in place of a ``Literal``'s, or for a ``str`` field).
        types: a parser of the option's one string per field, for a type without an option of its own or another
            syntax (such as ``256,256`` for a tuple).
        help: help per field, in place of ``field.metadata["help"]``.
        defaults: the default shown in the help per field, in place of the field's default (an object or its text:
            the command's default, or a default that depends on other options).
        deprecated: hidden old option names (``{"--old": "field"}``) of fields added here: they set the field (a
            ``bool`` one to True) and print a one-line note.

    Returns:
        The names of the fields added (each option's ``dest``), for :func:`collect`.

    Raises:
        TypeError: a field's type has no option and ``types`` gives no parser for it.
        ValueError: a name in ``names``, ``deprecated`` or a mapping is not a field of ``config_class``.
    """
    fields = {item.name: item for item in dataclasses.fields(config_class)}
    choices, types, help, defaults = choices or {}, types or {}, help or {}, defaults or {}
    deprecated = deprecated or {}
    for name in [*(names or ()), *exclude, *choices, *types, *help, *defaults]:
        if name not in fields:
            raise ValueError(f"{name!r} is not a field of {config_class.__name__}")
    hints = typing.get_type_hints(config_class)
    excluded = set(exclude)
    added = [name for name in (fields if names is None else names) if name not in excluded]
    arguments: dict[str, dict[str, Any]] = {}
    for name in added:
        item = fields[name]
        argument = _argument(name, hints[name], types.get(name))
        if name in choices:
            argument["choices"] = tuple(choices[name])
        text = help.get(name, item.metadata.get("help", ""))
        text += _default_text(item, defaults, nargs="nargs" in argument)
        parser.add_argument(_flag(name), default=None, help=text.replace("%", "%%"), **argument)
        arguments[name] = argument
    for old, name in deprecated.items():
        if name not in arguments:
            raise ValueError(f"{old} is an alias of {name!r}, which is not an option added here")
        argument = {key: value for key, value in arguments[name].items() if key != "action"}
        if arguments[name].get("action") is argparse.BooleanOptionalAction:
            argument = {"nargs": 0, "const": True}
        parser.add_argument(old, dest=name, action=_DeprecatedAlias, help=argparse.SUPPRESS, **argument)
    return added


def collect(
    args: argparse.Namespace, config_class: type, names: Iterable[str] | None = None
) -> dict[str, Any]:
    """The fields of ``config_class`` given on the command line (options that are not ``None``), lists as tuples.

    Args:
        args: the parsed options (from a parser :func:`add_options` filled).
        config_class: the dataclass.
        names: the fields to read (default: all of them; fields without an option are skipped).

    Raises:
        ValueError: a name in ``names`` is not a field of ``config_class``.
    """
    fields = [item.name for item in dataclasses.fields(config_class)]
    for name in names or ():
        if name not in fields:
            raise ValueError(f"{name!r} is not a field of {config_class.__name__}")
    values: dict[str, Any] = {}
    for name in fields if names is None else names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def parse_config(
    config_class: type,
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    quick: Mapping[str, Any] | None = None,
) -> Any:
    """``config_class`` from the command line ``argv``: one option per field (:func:`add_options`); a field ``quick``
    given True first applies the ``quick`` settings, then the options given. The benchmark scripts' parser.

    Multi-word fields also accept their underscore spelling (``--batch_size``), with a note to use ``--batch-size``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Bench:
        ...     batch_size: int = 256
        ...     quick: bool = False
        >>> parse_config(Bench, ["--quick"], quick={"batch_size": 8})
        Bench(batch_size=8, quick=True)
        >>> parse_config(Bench, ["--quick", "--batch-size", "16"], quick={"batch_size": 8})
        Bench(batch_size=16, quick=True)
    """
    parser = argparse.ArgumentParser(description=description)
    names = [item.name for item in dataclasses.fields(config_class)]
    add_options(parser, config_class, deprecated={f"--{name}": name for name in names if "_" in name})
    given = collect(parser.parse_args(argv), config_class)
    return config_class(**{**((quick or {}) if given.get("quick") else {}), **given})


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` inside the block and restored after it, however it ends (``None``:
    left as they are). The ``--threads`` option of the benchmark scripts and of training entry points.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
