"""Shared CLI pieces: a greedy multi-value option and input/output path checks."""

from __future__ import annotations

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
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def check_output(out: str | Path, inputs: list[str | Path]) -> Path:
    """Refuse an output that is, contains, or sits inside one of the inputs."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p.is_relative_to(o) or (p.is_dir() and o.is_relative_to(p)):
            raise ConfigError(f"--out {out}: would overwrite the input {i}; choose another path")
    return o
