"""The zoo side every application benchmark shares: models, evaluators, scores, rows.

Calibration scores (what choices are made on) and test scores (what tables report) use
two evaluators over the two disjoint splits. ``family="llm"`` takes the LLM zoo
(:mod:`npstune.zoo.llm`): its experts, and its own ``causal-lm`` evaluator file, as a
user's LLM would be scored. ``--quick`` shrinks grids and calibration
sets so the smoke tests in the suite stay short; the committed tables are full runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from npstune.evaluate.kinds import PRECISIONS

State = dict[str, torch.Tensor]

FULL_GRIDS: dict[str, Any] = {
    "ta": tuple(round(0.1 * i, 1) for i in range(1, 16)),
    "ties": tuple(round(0.8 + 0.1 * i, 1) for i in range(18)),
    # magnitude's kept entries may need more than TA's scale: NPS reaches λ·w_1 up to 4
    # on the same top-k mask, so a grid that stops at 1.5 would hand NPS a wider scale
    # range
    "magnitude": tuple(round(0.1 * i, 1) for i in range(1, 31)),
    "tall": (0.2, 0.3, 0.4, 0.5, 0.6),
    "q_coarse": 5,
    "q_fine": 2,
    # TSV-M / Iso-C / Iso-CTS α: 1 is the methods' default (fusion_bench's configs) and
    # the Iso paper tunes α on validation data. TSV-M's Δ is sum-like (every task's top
    # directions side by side), so its α may sit below 1 as TA's λ does (0.3 on the full
    # zoo); Iso's Δ puts the mean singular value of Σ τ_t (all p of them, tiny ones
    # included) on every direction, far below the top ones, so its α sits well above 1:
    # on the small zoo's calibration split TSV-M peaks near 2, Iso-C near 4, Iso-CTS at
    # 5-6, all falling by 10 (the methods' α bound). 0.1 apart up to 1, then coarser
    "alpha": tuple(round(0.1 * i, 1) for i in range(1, 11))
    + tuple(round(1.0 + 0.2 * i, 1) for i in range(1, 11))
    + (3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 10.0),
    # PCB: keep ratio ρ 0.05-0.2 and λ from 0.8 as its repo's NLP sweeps (τ_m is a
    # weighted mean of the kept entries, so λ ≥ 1 restores a sum-like scale, as TIES's
    # grid), λ on to 3.0 rather than the repo's 2.2: the small zoo's calibration split
    # peaks at 2.2 (ρ 0.1)
    "pcb_ratio": (0.05, 0.1, 0.2),
    "pcb_lam": tuple(round(0.8 + 0.2 * i, 1) for i in range(12)),
}
#: the LLM zoo's grids: one calibration evaluation of a 135M LLM on three tasks costs
#: ~20 s on 2 cores (the text zoo's ~1 s), so fewer, wider-spaced points
LLM_GRIDS: dict[str, Any] = {
    **FULL_GRIDS,
    "ta": (0.2, 0.4, 0.6, 0.8, 1.0, 1.3),
    "ties": (0.8, 1.0, 1.3, 1.6, 2.0),
    "magnitude": (0.4, 0.7, 1.0, 1.5, 2.0, 3.0),
}
QUICK_GRIDS: dict[str, Any] = {
    "ta": (0.3, 1.0),
    "ties": (1.0, 1.6),
    "magnitude": (0.3, 1.0, 1.6),
    "tall": (0.2, 0.4),
    "q_coarse": 2,
    "q_fine": 1,
    "alpha": (0.5, 1.0, 2.0, 4.0, 6.0),
    "pcb_ratio": (0.1,),
    "pcb_lam": (1.0, 1.6, 2.2),
}


class ZooBench:
    """A built zoo, its evaluators and the merge plan over all its task models."""

    def __init__(
        self,
        size: str = "small",
        quick: bool = False,
        calibration: int | None = None,
        test: int | None = None,
        device: str = "cpu",
        out_dir: Path | None = None,
        search_config: str | None = None,
        seed: int = 0,
        generations: int | None = None,
        population: int | None = None,
        precision: str = "fp32",
        family: str = "text",
    ):
        from npstune.evaluate.kinds import BuildContext, check_precision, get_kind
        from npstune.taskvector import plan_merge
        from npstune.zoo import ZOO_FAMILIES

        self.size = size
        self.family = family
        self.quick = quick
        self.seed = seed
        #: every evaluator's precision, the searches' included: fp32 (the committed
        #: tables'), unless --precision says otherwise
        self.precision = check_precision(precision, "--precision")
        self.generations, self.population = generations, population  # search budget
        self.search_skipped = ""
        #: the earlier results file --resume read, and the rows taken from it
        self.earlier: dict[str, Any] | None = None
        self.kept: list[str] = []
        t0 = time.perf_counter()
        self.zoo = ZOO_FAMILIES[family].build(size)
        self.size = self.zoo.size  # a size's name (also when given a recipe)
        self.zoo_ready_s = (
            time.perf_counter() - t0
        )  # a cached zoo: reuse time, reported
        self.tasks = list(self.zoo.tasks)
        self.grids = (
            QUICK_GRIDS if quick else LLM_GRIDS if family == "llm" else FULL_GRIDS
        )
        cal_n = calibration or (48 if quick else None)
        test_n = test or (96 if quick else None)
        if family == "llm":  # the zoo's causal-lm evaluator file, as a user's
            self.cal, self.tst = (
                self.zoo.evaluator(
                    device=device,
                    precision=self.precision,
                    prepare=(split,),
                    max_examples={split: n},
                )
                for split, n in (("calibration", cal_n), ("test", test_n))
            )
        else:
            zoo_kind = get_kind("zoo")  # the benchmarks' evaluators: the registry's
            self.cal, self.tst = (
                zoo_kind.build(
                    zoo_kind.options(),
                    BuildContext(
                        device=device,
                        batch_size=64,
                        precision=self.precision,
                        zoo=self.zoo,
                        prepare=(split,),
                        max_examples={split: n},
                    ),
                )
                for split, n in (("calibration", cal_n), ("test", test_n))
            )
        self.cal_n, self.test_n = cal_n, test_n
        self.plan = plan_merge(
            self.zoo.base_path, [self.zoo.task(t).model_path for t in self.tasks]
        )
        self.out_dir = out_dir
        self.search_config = search_config
        self.device = device
        self._ft: dict[str, float] | None = None
        self._data = None
        self.evals = 0

    # ------------------------------------------------------------------ args
    @staticmethod
    def add_arguments(
        ap: argparse.ArgumentParser, families: tuple[str, ...] = ("text",)
    ) -> None:
        """The shared options; ``families``: the zoo families this benchmark takes
        (the first is the default of ``--family``)."""
        from npstune.zoo import ZOO_FAMILIES

        ap.add_argument(
            "--zoo",
            default="small",
            choices=sorted({s for f in ZOO_FAMILIES.values() for s in f.sizes}),
        )
        ap.add_argument(
            "--family",
            default=families[0],
            choices=families,
            help="zoo family (text: the sentence-encoder zoo; llm: SmolLM2 experts)",
        )
        ap.add_argument(
            "--quick", action="store_true", help="coarse grids, few examples (smoke)"
        )
        ap.add_argument(
            "--calibration",
            type=int,
            default=None,
            help="calibration examples per task",
        )
        ap.add_argument(
            "--test",
            type=int,
            default=None,
            help="test examples per task (default all)",
        )
        ap.add_argument("--device", default="cpu")
        ap.add_argument(
            "--out-dir",
            type=Path,
            default=None,
            help="results dir (default benchmarks/results)",
        )
        ap.add_argument(
            "--search-config", default=None, help="search-space YAML for the NPS rows"
        )
        ap.add_argument("--name", default=None, help="results file name")
        ap.add_argument(
            "--precision",
            default="fp32",
            choices=PRECISIONS,
            help="evaluators' forward-pass precision, the searches' included "
            "(default fp32: the committed tables'; auto is what a user's search gets)",
        )
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument(
            "--generations",
            type=int,
            default=None,
            help="NPS search generations (default: the search file's)",
        )
        ap.add_argument(
            "--population",
            type=int,
            default=None,
            help="NPS search population (default: the search file's)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ZooBench:
        return cls(
            args.zoo,
            args.quick,
            args.calibration,
            args.test,
            args.device,
            args.out_dir,
            args.search_config,
            args.seed,
            args.generations,
            args.population,
            args.precision,
            getattr(args, "family", "text"),
        )

    # ------------------------------------------------------------------ states
    def base_state(self) -> State:
        return {k: self.plan.base[k] for k in self.plan.base.keys()}

    def model_state(self, t: int) -> State:
        m = self.plan.models[t]
        return {k: m[k] for k in m.keys()}

    def zoo_data(self) -> Any:
        from npstune.merge.data import EvaluatorData, zoo_data

        if self._data is None and self.family == "llm":  # each expert's dir: its task
            self._data = EvaluatorData(self.cal, self.cal_n or 256)
        if self._data is None:
            self._data = zoo_data(
                self.zoo, device=self.device, examples=self.cal_n or 256
            )
        return self._data

    # ------------------------------------------------------------------ scores
    def cal_score(self, state: State) -> float:
        """Mean calibration accuracy over all tasks (what every choice maximises)."""
        self.evals += 1
        return mean(self.cal.evaluate_many(state, self.tasks, "calibration").values())

    def cal_task_score(self, state: State, t: int) -> float:
        self.evals += 1
        return self.cal.evaluate(state, self.tasks[t], "calibration")

    def test(self, state: State, tasks: list[str] | None = None) -> dict[str, float]:
        return self.tst.evaluate_many(state, tasks or self.tasks, "test")

    def test_task(self, state: State, task: str) -> float:
        return self.tst.evaluate(state, task, "test")

    def finetuned_test(self) -> dict[str, float]:
        """Each task's own fine-tuned model on its own test split."""
        if self._ft is None:
            self._ft = {
                t: self.test_task(self.model_state(i), t)
                for i, t in enumerate(self.tasks)
            }
        return self._ft

    def row(
        self, method: str, choice: str, per_task: Mapping[str, float], seconds: float
    ) -> dict[str, Any]:
        ft = self.finetuned_test()
        r: dict[str, Any] = {"method": method, "choice": choice}
        r.update({t: per_task[t] for t in self.tasks if t in per_task})
        r["mean"] = mean(per_task.values())
        r["normalized"] = mean(per_task[t] / ft[t] for t in per_task if ft[t] > 0)
        r["seconds"] = round(seconds, 1)
        return r

    # ------------------------------------------------------------------ NPS search
    def search_config_path(self, use: str) -> Path:
        if self.search_config:
            return Path(self.search_config)
        root = Path(__file__).resolve().parent.parent / "searchspaces"
        stem = f"nps-llm-{use}" if self.family == "llm" else f"nps-{use}"
        small = root / f"{stem}-small.yaml"
        return (
            small if self.size == "small" and small.exists() else root / f"{stem}.yaml"
        )

    def search_budget(
        self,
        generations: int | None = None,
        population: int | None = None,
        quick_generations: int = 1,
    ) -> dict[str, Any]:
        """Dotted search-config overrides for the budget: --quick's small one, then the
        explicit ``generations``/``population`` (None: this bench's --generations /
        --population, else the file's); and this bench's evaluator precision."""
        generations = generations or self.generations
        population = population or self.population
        o: dict[str, Any] = {"evaluator.precision": self.precision}
        if os.environ.get("NPSTUNE_BENCH_NO_MLFLOW"):
            o["tracking.enabled"] = False
        if self.quick:
            o.update({"search.generations": quick_generations, "search.population": 4})
        if generations:
            o["search.generations"] = generations
        if population:
            o["search.population"] = population
        return o

    def nps_search(
        self, use: str = "fusion", **overrides: Any
    ) -> tuple[State, str, Any] | None:
        """Run the NPS search (calibration split only) and load its best model.

        Returns (best state ({} for ``use="compression"``, whose best is a sparse
        store), a description of the candidate, the SearchOutcome), or None when the
        search extra is not installed (``self.search_skipped`` says why).
        """
        try:
            from npstune.search import load_config, run_search
        except ImportError as exc:
            self.search_skipped = f"npstune.search could not be imported ({exc})"
            print(f"NPS search skipped: {self.search_skipped}", flush=True)
            return None
        from npstune.checkpoints import open_checkpoint

        o: dict[str, Any] = {
            "zoo": self.size,
            "tracking.experiment": "npstune-benchmarks",
            "evaluator.calibration_examples": self.cal_n,
            "evaluator.test_examples": self.test_n,
            # the benchmark scores its own baseline rows: the search's final table
            # would evaluate them again, on the test split, for nothing
            "report.baselines": [],
            "output_dir": str(Path(tempfile.mkdtemp(prefix="npstune-bench-search-"))),
        }
        if self.family == "llm":  # the LLM zoo's models and its own evaluator file
            o = {
                "base": str(self.zoo.base_path),
                "models": [str(self.zoo.task(t).model_path) for t in self.tasks],
                **{f"evaluator.{k}": v for k, v in self.search_evaluator().items()},
                **{k: v for k, v in o.items() if k != "zoo"},
            }
        o.update(self.search_budget())
        o.update(overrides)
        cfg = load_config(self.search_config_path(use), **o)
        outcome = run_search(cfg, echo=lambda m: print(f"  [search] {m}", flush=True))
        best_path = outcome.report.files.get("best_model") if outcome.report else None
        if best_path is None or outcome.best is None:
            raise RuntimeError(f"the NPS search in {cfg.out} produced no best model")
        state: State = {}
        if (
            use != "compression"
        ):  # a compression search writes a sparse store, not a model
            ck = open_checkpoint(best_path)
            state = {k: ck[k] for k in ck.keys()}
        params = ", ".join(
            f"{k}={v:.3g}" for k, v in list(outcome.best.params.items())[:12]
        )
        desc = f"{outcome.trials} trials, {outcome.generations} gen; {params}"
        return state, desc, outcome

    def earlier_sections(self, name: str) -> dict[str, list[dict[str, Any]]]:
        """Sections (title -> rows) of an earlier results file ``name``.json made on
        this zoo recipe with the same splits and seed; {} when there is none or it
        differs."""
        import json

        from benchmarks.common import RESULTS

        path = (self.out_dir or RESULTS) / f"{name}.json"
        if not path.exists():
            return {}
        old = json.loads(path.read_text())
        same = (
            "zoo",
            "zoo_recipe",
            "tasks",
            "quick",
            "calibration_examples",
            "test_examples",
            "seed",
        )
        mine = self.meta()
        if any(old.get(k) != mine[k] for k in same):
            print(
                f"--resume: {path} was made with another setup; recomputing every row"
            )
            return {}
        self.earlier = old
        return dict(old.get("sections", {}))

    def provenance(self, method: str) -> dict[str, Any]:
        """Where a row kept from the earlier run was measured: that run's commit and
        processor, or those its own file recorded for a row it kept in turn."""
        old = self.earlier or {}
        machine = old.get("machine", {})
        return old.get("resumed_rows", {}).get(method) or {
            "git": machine.get("git"),
            "processor": machine.get("processor"),
        }

    def resumed_notes(self) -> list[str]:
        """One note per earlier run that rows of this table come from."""
        groups: dict[tuple[Any, Any], list[str]] = {}
        for m in self.kept:
            prov = self.provenance(m)
            groups.setdefault((prov["git"], prov["processor"]), []).append(m)
        return [
            f"kept from an earlier run (--resume; same zoo, splits and seed), measured "
            f"at git {git} on {proc}: " + "; ".join(ms)
            for (git, proc), ms in groups.items()
        ]

    def earlier_rows(self, name: str) -> dict[str, dict[str, Any]]:
        """Rows (method -> row) of every section of :meth:`earlier_sections`."""
        rows = [r for sec in self.earlier_sections(name).values() for r in sec]
        return {r["method"]: r for r in rows if "method" in r}

    # ------------------------------------------------------------------ report bits
    def search_evaluator(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """The search config's ``evaluator:`` section for the LLM zoo: its file's keys
        (paths relative to the zoo), limited to ``tasks`` (default: the experts')."""
        import yaml

        path = self.zoo.evaluator_path
        data = yaml.safe_load(path.read_text())
        data["tasks"] = {t: data["tasks"][t] for t in tasks or self.tasks}
        data.pop("model", None)  # the search's base is the model
        return {**data, "file": str(path), "root": str(path.parent)}

    def meta(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "zoo": self.size,
            "zoo_recipe": self.zoo.manifest.get("recipe_hash"),
            "tasks": self.tasks,
            "quick": self.quick,
            "calibration_examples": self.cal_n or "all",
            "test_examples": self.test_n or "all",
            "seed": self.seed,
            "n": self.plan.n,
            "calibration_evaluations": self.evals,
            "zoo_ready_s": self.zoo_ready_s,
            **(
                {"resumed_rows": {m: self.provenance(m) for m in self.kept}}
                if self.kept
                else {}
            ),
        }

    def notes(self) -> list[str]:
        return [
            "test split only for the reported numbers; every λ, α, ρ, q, λ_t and NPS "
            "weight was chosen on the calibration split",
            "normalized = accuracy / the task's own fine-tuned accuracy; n = "
            f"{self.plan.n} task-vector entries (embeddings frozen)",
            *self.resumed_notes(),
        ]
