"""`npstune eval`: score a checkpoint on zoo tasks or on an evaluator file's tasks.

- ``npstune eval --zoo SIZE --model PATH [--json]``: zoo tasks (accuracy, normalized).
- ``npstune eval --model PATH --evaluator FILE [--split] [--json]``: any evaluator kind;
  ``--json`` prints ``{"scores", "metrics", "examples", "mean"}`` (DESIGN §8).
"""

from __future__ import annotations

import json

import click

from npstune.cli import names
from npstune.cli.options import RegistryChoice


@click.command(name="eval")
@click.option(
    "--zoo",
    "size",
    type=RegistryChoice(names.zoo_sizes),
    default=None,
    help="Which built zoo supplies tasks, heads and data.",
)
@click.option(
    "--evaluator",
    "evaluator",
    type=click.Path(dir_okay=False),
    default=None,
    help="An evaluator file (YAML): kind, tasks and their data.",
)
@click.option(
    "--model",
    "model",
    type=click.Path(exists=True),
    required=True,
    help="Checkpoint: a .safetensors file, a torch file or an HF model dir.",
)
@click.option(
    "--split", type=RegistryChoice(names.splits), default="test", show_default=True
)
@click.option("--tasks", default=None, help="Comma-separated subset of the tasks.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Examples per forward pass (default: the file's, else 32).",
)
@click.option(
    "--precision",
    type=RegistryChoice(names.precisions),
    default=None,
    help="Forward-pass autocast: auto (bf16 on CUDA and on CPUs with native bf16, "
    "fp32 elsewhere), fp32 or bf16 (default: the evaluator file's, else auto).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Zoo cache (default: $NPSTUNE_ZOO_DIR or ~/.cache/npstune/zoo).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(
    size: str | None,
    evaluator: str | None,
    model: str,
    split: str,
    tasks: str | None,
    device: str,
    batch_size: int | None,
    precision: str | None,
    cache_dir: str | None,
    as_json: bool,
) -> None:
    """Print per-task scores of MODEL on the zoo's or an evaluator file's tasks."""
    from npstune.errors import ConfigError

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if (size is None) == (evaluator is None):
        raise ConfigError("give exactly one of --zoo SIZE or --evaluator FILE")
    if evaluator is not None:
        _eval_file(
            evaluator, model, split, names, device, batch_size, precision, as_json
        )
        return
    assert size is not None
    from npstune.evaluate.text import evaluate_checkpoint
    from npstune.zoo import load_zoo

    z = load_zoo(size, cache_dir=cache_dir)
    res = evaluate_checkpoint(
        z, model, split=split, tasks=names, device=device, precision=precision or "auto"
    )
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{model} on the {size} zoo, {split} split")
    click.echo(f"  {'task':<16} {'accuracy':>8} {'finetuned':>9} {'normalized':>10}")
    for t, a in res["accuracy"].items():
        ref, norm = res["finetuned"].get(t), res["normalized"].get(t)
        click.echo(
            f"  {t:<16} {a:>8.4f} {ref if ref is None else format(ref, '>9.4f'):>9} "
            f"{'-' if norm is None else format(norm, '>10.4f'):>10}"
        )
    mn = res["mean_normalized"]
    click.echo(
        f"  {'mean':<16} {res['mean']:>8.4f} {'':>9} "
        f"{'-' if mn is None else format(mn, '>10.4f'):>10}"
    )


def _eval_file(
    path: str,
    model: str,
    split: str,
    tasks: list[str] | None,
    device: str,
    batch_size: int | None,
    precision: str | None,
    as_json: bool,
) -> None:
    from npstune.evaluate.base import evaluation_report
    from npstune.evaluate.hf import read_state
    from npstune.evaluate.spec import load_evaluator_file
    from npstune.runtime import resolve_device

    ef = load_evaluator_file(path)
    ev = ef.build(
        model=model,
        device=str(resolve_device(device)),
        batch_size=batch_size,
        precision=precision,
        tasks=tasks,
        prepare=(split,),
    )
    names = tasks if tasks is not None else list(ev.tasks)
    res = evaluation_report(ev, read_state(model), names, split)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{model} with {path} ({ef.kind}), {split} split")
    click.echo(f"  {'task':<20} {'metric':<12} {'score':>10} {'examples':>8}")
    for t, v in res["scores"].items():
        n = res["examples"][t]
        click.echo(
            f"  {t:<20} {res['metrics'][t]:<12} {v:>10.4f} {'-' if n is None else n:>8}"
        )
    click.echo(f"  {'mean':<20} {'':<12} {res['mean']:>10.4f}")
