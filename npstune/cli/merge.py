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
    split_params,
    typed_params,
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
    "--param",
    "param_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any parameter the method declares (repeatable; typed and range-checked "
    "by the method; `npstune methods` lists them). prune.NAME=VALUE sets one of "
    "the --prune step's.",
)
@click.option(
    "--prune",
    type=RegistryChoice(names.prune_methods),
    cls=HelpFromRegistry,
    help="Prune every task vector first (its k, weights, subspaces, scope, seed, q "
    "from the flags or prune.NAME=VALUE), then merge the pruned ones.",
    help_names=("Methods: ", names.prunable_methods),
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
    param_items: tuple[str, ...],
    prune: str | None,
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
    flags = {
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
    method_values, prune_step = _route(
        spec, {n: v for n, v in flags.items() if v is not None}, param_items, prune
    )
    params = spec.make_params(method_values)
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
        prune=prune_step,
    )
    keep = ("method", "tasks", "n", "kept", "rank", "total_s")
    summary = {k: v for k, v in result.meta.items() if k in keep}
    if "prune" in result.meta:
        summary["prune"] = {
            k: result.meta["prune"][k] for k in ("method", "kept", "density")
        }
    click.echo(f"wrote {out}  " + json.dumps(summary, default=str))


def _route(
    spec: Any, flags: dict[str, Any], items: tuple[str, ...], prune: str | None
) -> tuple[dict[str, Any], Any]:
    """The method's values and the pruning step from the flags and ``--param``.

    Without ``--prune`` every flag is the method's. With it, a flag that only the
    pruning takes (``--k`` before TSV-M) is the pruning's; one that both take is
    ambiguous and must be said with ``--param NAME=`` (the method) or
    ``--param prune.NAME=`` (the pruning)."""
    from npstune.errors import ConfigError
    from npstune.merge.preprune import Prune

    pairs = split_params(items)
    own = typed_params(
        spec.params, spec.name, [(n, v) for n, v in pairs if not n.startswith("prune.")]
    )
    prune_pairs = [(n[6:], v) for n, v in pairs if n.startswith("prune.")]
    if prune is None:
        if prune_pairs:
            raise ConfigError(f"--param prune.{prune_pairs[0][0]}: needs --prune")
        method_values = dict(flags)
        step = None
    else:
        step_names = Prune(prune).names()
        mine = set(spec.params.model_fields)
        both = sorted(n for n in flags if n in step_names and n in mine)
        if both:
            n = both[0]
            raise ConfigError(
                f"--{n.replace('_', '-')}: both {spec.name} and the {prune} pruning "
                f"take {n}; say --param {n}=V ({spec.name}) or --param prune.{n}=V "
                f"({prune})"
            )
        pspec = Prune(prune).spec
        pvals = {n: v for n, v in flags.items() if n in step_names}
        pvals.update(typed_params(pspec.params, f"the {prune} pruning", prune_pairs))
        if "lam" in pvals:  # a declared parameter of the method, not of its pruning
            raise ConfigError(
                f"--param prune.lam: the {prune} pruning has no λ of its own (the "
                "merge scales); valid: " + ", ".join(step_names)
            )
        method_values = {n: v for n, v in flags.items() if n not in step_names}
        step = Prune(prune, pvals)
        step.resolved()
    for n in own:
        if n in method_values:
            raise ConfigError(
                f"--param {n}: also given as --{n.replace('_', '-')}; give it once"
            )
    method_values.update(own)
    return method_values, step
