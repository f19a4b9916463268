"""``npstune merge``: merge fine-tuned checkpoints into one (DESIGN §8)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from npstune.cli import names
from npstune.cli.options import (
    GreedyOption,
    HelpFromRegistry,
    RegistryChoice,
    check_output,
    parse_floats,
)

if TYPE_CHECKING:  # the merge engine (torch) loads when a merge runs
    from npstune.merge.base import OutFormat


def _used_by(field: str) -> dict[str, Any]:
    """Option settings whose help ends with the methods that take parameter
    ``field``."""
    return {
        "cls": HelpFromRegistry,
        "help_names": ("Used by: ", lambda: names.methods_with(field)),
    }


@click.command("merge")
@click.option(
    "--method",
    required=True,
    type=RegistryChoice(names.merge_methods),
    help="Merge method (`npstune methods` lists their parameters).",
)
@click.option("--base", required=True, type=click.Path(), help="Pretrained checkpoint.")
@click.option(
    "--models",
    required=True,
    cls=GreedyOption,
    type=click.Path(),
    help="Fine-tuned checkpoints or PEFT LoRA adapter directories (one or more).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Output: NAME.safetensors, NAME.bin/.pt/.pth, or a directory (an "
    "existing one, DIR/ or a name without suffix); else the base's form.",
)
@click.option(
    "--out-format",
    type=click.Choice(["model", "adapter"]),
    default="model",
    show_default=True,
    cls=HelpFromRegistry,
    help="adapter: write a LoRA adapter directory (of LoRA adapters; exact, "
    "ranks concatenated).",
    help_names=("Methods: ", names.adapter_methods),
)
@click.option("--k", "k", type=float, help="Keep ratio in (0, 1].", **_used_by("k"))
@click.option("--lam", type=float, help="Scaling λ.", **_used_by("lam"))
@click.option(
    "--scope",
    type=click.Choice(["global", "tensor"]),
    help="Top-k ranking scope.",
    **_used_by("scope"),
)
@click.option(
    "--subspaces", type=int, help="NPS subspace count M.", **_used_by("subspaces")
)
@click.option(
    "--weights",
    help="NPS weights: M values, or T·M values task-major.",
    **_used_by("weights"),
)
@click.option("--seed", type=int, help="Seed for random masks.", **_used_by("seed"))
@click.option(
    "--q", type=float, help="DAREx rescaling denominator q in [k, 1].", **_used_by("q")
)
@click.option("--tall-lam", type=float, help="TALL mask λ.", **_used_by("tall_lam"))
@click.option(
    "--consensus",
    type=int,
    help="Masks that must agree (default 2).",
    **_used_by("consensus"),
)
@click.option(
    "--include", multiple=True, help="Glob of keys that take part (repeatable)."
)
@click.option(
    "--exclude", multiple=True, help="Glob of keys copied from the base (repeatable)."
)
@click.option(
    "--zoo",
    "zoo_size",
    type=RegistryChoice(names.zoo_sizes),
    cls=HelpFromRegistry,
    help="Zoo whose calibration data feeds a data-driven method.",
    help_names=("Methods: ", names.data_methods),
)
@click.option(
    "--evaluator",
    "evaluator_file",
    type=click.Path(),
    cls=HelpFromRegistry,
    help="Evaluator YAML giving the calibration data of data-driven methods.",
    help_names=("Methods: ", names.data_methods),
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge(
    method: str,
    base: str,
    models: tuple[str, ...],
    out: str,
    out_format: OutFormat,  # click.Choice of OutFormat's values
    k: float | None,
    lam: float | None,
    scope: str | None,
    subspaces: int | None,
    weights: str | None,
    seed: int | None,
    q: float | None,
    tall_lam: float | None,
    consensus: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    zoo_size: str | None,
    evaluator_file: str | None,
    device: str,
    quiet: bool,
) -> None:
    """Merge MODELS onto BASE with METHOD and write OUT."""
    from npstune.merge import get_method, run_merge
    from npstune.merge.base import adapter_weights
    from npstune.runtime import resolve_device
    from npstune.taskvector import plan_merge

    spec = get_method(method)
    given = {
        "k": k,
        "lam": lam,
        "scope": scope,
        "subspaces": subspaces,
        "weights": parse_floats(weights, "--weights"),
        "seed": seed,
        "q": q,
        "tall_lam": tall_lam,
        "consensus": consensus,
    }
    params = spec.make_params({n: v for n, v in given.items() if v is not None})
    if out_format == "adapter":
        adapter_weights(spec.name, params, len(models))  # refuse other methods first
    check_output(out, [base, *models])
    dev = resolve_device(device)
    data: Any = None
    if spec.needs_data:
        from npstune.merge.data import data_for

        data = data_for(zoo_size, dev, evaluator=evaluator_file, base=base)
    plan = plan_merge(base, list(models), include or None, exclude or None)
    result = run_merge(
        plan,
        spec,
        params,
        out,
        device=dev,
        data=data,
        progress=not quiet,
        out_format=out_format,
    )
    keep = ("method", "tasks", "n", "kept", "rank", "total_s")
    summary = {k: v for k, v in result.meta.items() if k in keep}
    click.echo(f"wrote {out}  " + json.dumps(summary, default=str))
