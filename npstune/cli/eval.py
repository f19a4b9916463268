"""`npstune eval --zoo SIZE --model PATH`: accuracy of a body checkpoint on zoo tasks."""

from __future__ import annotations

import json

import click

from npstune.zoo.recipe import ZOO_SIZES


@click.command(name="eval")
@click.option("--zoo", "size", type=click.Choice(sorted(ZOO_SIZES)), required=True,
              help="Which built zoo supplies tasks, heads and data.")
@click.option("--model", "model", type=click.Path(exists=True), required=True,
              help="Body checkpoint: a .safetensors file or an HF model dir.")
@click.option("--split", type=click.Choice(["test", "calibration"]), default="test",
              show_default=True)
@click.option("--tasks", default=None, help="Comma-separated subset of the zoo's tasks.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Zoo cache (default: $NPSTUNE_ZOO_DIR or ~/.cache/npstune/zoo).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(size: str, model: str, split: str, tasks: str | None, device: str,
             cache_dir: str | None, as_json: bool) -> None:
    """Print per-task and mean accuracy of MODEL on the zoo's test (or calibration) split."""
    from npstune.evaluate.text import evaluate_checkpoint
    from npstune.zoo import load_zoo

    z = load_zoo(size, cache_dir=cache_dir)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    res = evaluate_checkpoint(z, model, split=split, tasks=names, device=device)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{model} on the {size} zoo, {split} split")
    click.echo(f"  {'task':<16} {'accuracy':>8} {'finetuned':>9} {'normalized':>10}")
    for t, a in res["accuracy"].items():
        ref, norm = res["finetuned"].get(t), res["normalized"].get(t)
        click.echo(f"  {t:<16} {a:>8.4f} {ref if ref is None else format(ref, '>9.4f'):>9} "
                   f"{'-' if norm is None else format(norm, '>10.4f'):>10}")
    mn = res["mean_normalized"]
    click.echo(f"  {'mean':<16} {res['mean']:>8.4f} {'':>9} "
               f"{'-' if mn is None else format(mn, '>10.4f'):>10}")
