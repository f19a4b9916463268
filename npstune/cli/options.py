"""Shared CLI pieces: a greedy multi-value option, input/output path checks, and choices
and help lists read from the registries when they are shown."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from npstune.errors import ConfigError


class GreedyOption(click.Option):
    """``--models A B C``: take every following argument up to the next option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)
            if opt is None:
                continue
            original = opt.process

            def process(value: Any, state: Any, _orig=original) -> None:
                values = [value]
                while state.rargs and not state.rargs[0].startswith("-"):
                    values.append(state.rargs.pop(0))
                for v in values:
                    _orig(v, state)

            opt.process = process


def parse_floats(text: str | None, name: str) -> list[float] | None:
    """``"1,0.5,2"`` -> [1.0, 0.5, 2.0]; ConfigError naming the flag otherwise."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(
            f"{name}: expected comma-separated numbers, got {text!r}"
        ) from None


def check_output(out: str | Path, inputs: list[str | Path]) -> Path:
    """Refuse an output that is, contains, or sits inside one of the inputs."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p.is_relative_to(o) or (p.is_dir() and o.is_relative_to(p)):
            raise ConfigError(
                f"--out {out}: would overwrite the input {i}; choose another path"
            )
    return o


class RegistryChoice(click.Choice):
    """A :class:`click.Choice` whose choices a registry's name function gives each time
    they are needed (a help page, a value to check), never at import: the command line
    retypes no registry name, follows plugins, and ``npstune --help`` imports no
    registry."""

    def __init__(
        self, names: Callable[[], Iterable[str]], case_sensitive: bool = True
    ) -> None:
        self._names = names
        self.case_sensitive = case_sensitive

    # click.Choice's choices is a plain attribute; here it is read-only on purpose
    # (always the registry's current names)
    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())


class HelpFromRegistry(click.Option):
    """An option whose help ends with a list a registry gives when the help is shown:
    ``help_names=(prefix, function)`` appends ``prefix + ", ".join(function()) +
    "."``."""

    def __init__(
        self,
        *args: Any,
        help_names: tuple[str, Callable[[], Iterable[str]]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._base_help = self.help or ""
        self._help_names = help_names

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        prefix, names = self._help_names
        listed = ", ".join(names()) or "none"
        self.help = f"{self._base_help} {prefix}{listed}.".strip()
        return super().get_help_record(ctx)


def split_params(pairs: Iterable[str]) -> list[tuple[str, str]]:
    """``--param NAME=VALUE`` occurrences as (NAME, VALUE); ConfigError otherwise."""
    out = []
    for item in pairs:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        out.append((name.strip(), value.strip()))
    return out


def typed_params(
    params_cls: type, owner: str, pairs: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    """``(NAME, text)`` pairs as values typed by ``params_cls``'s declaration (ranges
    are checked when the method validates them): numbers for numeric parameters, a
    comma-separated (or ``[...]``) list where the parameter takes a list, ``none`` for
    an optional one, text otherwise. An unknown NAME is one ConfigError listing the
    valid names of ``owner``."""
    from npstune.search.params import declared

    decl = declared(params_cls)
    out: dict[str, Any] = {}
    for name, text in pairs:
        d = decl.get(name)
        if d is None:
            raise ConfigError(
                f"--param {name}: not a parameter of {owner}; valid: "
                f"{', '.join(decl) or '(none)'}"
            )
        if name in out:
            raise ConfigError(f"--param {name}: given twice")
        out[name] = _typed(d, text, f"--param {name}={text}")
    return out


def _typed(d: Any, text: str, where: str) -> Any:
    if text.lower() in ("none", "null") and d.default is None:
        return None
    listed = text.startswith("[") or (d.per_task and "," in text)
    if d.per_task and listed:
        items = [x for x in text.strip("[]").replace(" ", "").split(",") if x != ""]
        return [_scalar(d, x, where) for x in items]
    if d.per_task and not d.numeric:  # a list of names (exclude_keys)
        return [x for x in text.split(",") if x]
    return _scalar(d, text, where)


def _scalar(d: Any, text: str, where: str) -> Any:
    if d.integer:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer") from None
    if d.numeric:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number") from None
    return text
