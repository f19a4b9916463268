"""``npstune merge``: merge fine-tuned checkpoints into one (DESIGN §8)."""

from __future__ import annotations

import json

import click

from npstune.cli.options import GreedyOption, check_output, parse_floats


@click.command("merge")
@click.option("--method", required=True, help="average, task-arithmetic, ties, dare, darex, "
              "magnitude, consensus-ta, consensus-ties, nps, fisher, regmean")
@click.option("--base", required=True, type=click.Path(), help="Pretrained checkpoint.")
@click.option("--models", required=True, cls=GreedyOption, type=click.Path(),
              help="Fine-tuned checkpoints (one or more).")
@click.option("--out", required=True, type=click.Path(), help="Output (the base's form).")
@click.option("--k", "k", type=float, help="Keep ratio in (0, 1].")
@click.option("--lam", type=float, help="Scaling λ.")
@click.option("--scope", type=click.Choice(["global", "tensor"]), help="Top-k ranking scope.")
@click.option("--subspaces", type=int, help="NPS subspace count M.")
@click.option("--weights", help="NPS weights: M values, or T·M values task-major.")
@click.option("--seed", type=int, help="Seed for random masks (DARE).")
@click.option("--q", type=float, help="DAREx rescaling denominator q in [k, 1].")
@click.option("--tall-lam", type=float, help="TALL mask λ (consensus).")
@click.option("--consensus", type=int, help="Masks that must agree (consensus, default 2).")
@click.option("--include", multiple=True, help="Glob of keys that take part (repeatable).")
@click.option("--exclude", multiple=True, help="Glob of keys copied from the base (repeatable).")
@click.option("--zoo", "zoo_size", help="Zoo size for data-driven methods (fisher, regmean).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge(method, base, models, out, k, lam, scope, subspaces, weights, seed, q, tall_lam,
          consensus, include, exclude, zoo_size, device, quiet) -> None:
    """Merge MODELS onto BASE with METHOD and write OUT."""
    from npstune.merge import get_method, run_merge
    from npstune.runtime import resolve_device
    from npstune.taskvector import plan_merge

    spec = get_method(method)
    given = {"k": k, "lam": lam, "scope": scope, "subspaces": subspaces,
             "weights": parse_floats(weights, "--weights"), "seed": seed, "q": q,
             "tall_lam": tall_lam, "consensus": consensus}
    params = spec.make_params({n: v for n, v in given.items() if v is not None})
    check_output(out, [base, *models])
    dev = resolve_device(device)
    data = None
    if spec.needs_data:
        from npstune.merge.data import data_for

        data = data_for(zoo_size, dev)
    plan = plan_merge(base, list(models), include or None, exclude or None)
    result = run_merge(plan, spec, params, out, device=dev, data=data, progress=not quiet)
    summary = {k: v for k, v in result.meta.items() if k in ("method", "tasks", "n", "kept", "total_s")}
    click.echo(f"wrote {out}  " + json.dumps(summary, default=str))
