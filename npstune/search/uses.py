"""The three uses of a search (DESIGN §2), each a small strategy object.

A use decides which task vectors a candidate combines, which tasks a state is scored
on, how per-task scores become the searched objective, and the labels of its report.
Nothing else in ``npstune.search`` branches on the use's name.

- ``fusion``: every task vector merged into one model; objective = mean score.
- ``transfer``: the target's task vector alone; scored on the pre-tasks and the target;
  objective = H-score 2·A_pre·A_tgt / (A_pre + A_tgt).
- ``compression``: each task vector alone on its own task; objective = mean
  normalized score (score / the fine-tuned model's, same split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from npstune.errors import ConfigError


@dataclass(frozen=True)
class Selection:
    """Which task vectors a use combines and which tasks it scores."""

    vectors: list[int]  # indices into the search's models
    eval_tasks: list[str]  # tasks a shared state is scored on
    transfer: tuple[list[str], str] | None = None  # (pre tasks, target)


class Use:
    """Base: fusion's behaviour; the other uses override what differs."""

    name = "fusion"
    metric_label = "mean acc"
    extra_columns: tuple[str, ...] = ()
    per_vector_states = False  # compression: one state per task vector
    needs_references = False  # compression: normalized by the fine-tuned scores
    individual_label = "fine-tuned (individual)"
    baselines: tuple[str, ...] = ("pretrained", "individual", "task-arithmetic", "ties")
    needs_section = False  # transfer: a transfer: section names target and pre-tasks

    def select(self, cfg: Any, names: Sequence[str]) -> Selection:
        return Selection(list(range(len(names))), list(names))

    def scored_tasks(
        self, vector_tasks: Sequence[str], eval_tasks: Sequence[str]
    ) -> list[str]:
        """The tasks a shared state (pretrained, a merge) is scored on."""
        return list(eval_tasks)

    def individual_tasks(self, task: str, eval_tasks: Sequence[str]) -> list[str]:
        """The tasks the fine-tuned model of ``task`` is scored on."""
        return [task]

    def aggregate(
        self,
        accs: Mapping[str, float],
        refs: Mapping[str, float],
        transfer: tuple[list[str], str] | None,
    ) -> dict[str, float]:
        """Per-task scores -> the objective plus its parts."""
        out = {f"acc/{t}": float(a) for t, a in accs.items()}
        vals = list(accs.values())
        out["accuracy"] = sum(vals) / len(vals) if vals else float("nan")
        out["objective"] = out["accuracy"]
        return out


class Transfer(Use):
    name = "transfer"
    metric_label = "H-score"
    extra_columns = ("pre_accuracy", "target_accuracy")
    individual_label = "fine-tuned (target)"
    baselines = ("pretrained", "individual")
    needs_section = True

    def select(self, cfg: Any, names: Sequence[str]) -> Selection:
        t = cfg.transfer
        if t.target not in names:
            raise ConfigError(
                f"transfer.target {t.target!r} is not one of the models: "
                f"{', '.join(names)}"
            )
        return Selection(
            [list(names).index(t.target)],
            [*t.pre_tasks, t.target],
            (list(t.pre_tasks), t.target),
        )

    def individual_tasks(self, task: str, eval_tasks: Sequence[str]) -> list[str]:
        return list(eval_tasks)

    def aggregate(
        self,
        accs: Mapping[str, float],
        refs: Mapping[str, float],
        transfer: tuple[list[str], str] | None,
    ) -> dict[str, float]:
        out = super().aggregate(accs, refs, transfer)
        assert transfer is not None
        pre_tasks, tgt = transfer
        pre = sum(accs[t] for t in pre_tasks) / len(pre_tasks)
        a_t = accs[tgt]
        h = 2 * pre * a_t / (pre + a_t) if pre + a_t > 0 else 0.0
        out.update(pre_accuracy=pre, target_accuracy=a_t, h_score=h, objective=h)
        return out


class Compression(Use):
    name = "compression"
    metric_label = "norm. acc"
    extra_columns = ("accuracy",)
    per_vector_states = True
    needs_references = True
    baselines = ("pretrained", "individual")

    def scored_tasks(
        self, vector_tasks: Sequence[str], eval_tasks: Sequence[str]
    ) -> list[str]:
        return list(vector_tasks)

    def aggregate(
        self,
        accs: Mapping[str, float],
        refs: Mapping[str, float],
        transfer: tuple[list[str], str] | None,
    ) -> dict[str, float]:
        out = super().aggregate(accs, refs, transfer)
        norm = [accs[t] / refs[t] for t in accs if refs.get(t)]
        out["normalized_accuracy"] = sum(norm) / len(norm) if norm else float("nan")
        out["objective"] = out["normalized_accuracy"]
        return out


#: The registry of uses: the search file's ``use:`` choices come from it.
USES: dict[str, Use] = {u.name: u for u in (Use(), Transfer(), Compression())}


def get_use(name: str) -> Use:
    try:
        return USES[name]
    except KeyError:
        raise ConfigError(f"unknown use {name!r}; valid: {', '.join(USES)}") from None
