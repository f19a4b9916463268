"""``npstune search CONFIG.yaml [--resume] [--backend NAME]`` (DESIGN §8); NAME is one
of ``npstune.search.backends.BACKENDS``."""

from __future__ import annotations

import click

from npstune.cli import names
from npstune.cli.options import RegistryChoice


@click.command("search")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the search in the config's output_dir from its last finished "
    "generation (and its MLflow run).",
)
@click.option(
    "--backend",
    type=RegistryChoice(names.search_backends),
    help="Optimizer backend (overrides the file's search.backend).",
)
def search(config: str, resume: bool, backend: str | None) -> None:
    """Search NPS subspace weights (and k, λ) with CONFIG, a search-space YAML file.

    Every candidate is a Ray Tune trial (local Ray, or the cluster under `ray job
    submit`); runs are logged to MLflow; the best candidate, the model built from it and
    a table against the baselines are written to the output directory.
    """
    from npstune.search.runner import run_search
    from npstune.search.space import load_configs
    from npstune.tracking import ui_command

    configs = load_configs(config, **{"search.backend": backend})
    for cfg in configs:
        if len(configs) > 1:
            click.echo(f"== {cfg.name}")
        outcome = run_search(cfg, resume=resume, echo=click.echo)
        report = outcome.report
        click.echo("")
        if report is not None:
            click.echo(report.markdown())
            for what, path in report.files.items():
                click.echo(f"{what}: {path}")
        click.echo(
            f"search: {outcome.trials} trials in {outcome.generations} generations, "
            f"{outcome.search_s:.0f} s (total {outcome.wall_s:.0f} s)"
        )
        if cfg.tracking.enabled:
            click.echo(
                f"MLflow run {outcome.run_id}; open the UI with: "
                f"{ui_command(cfg.tracking_uri)}"
            )
