"""The search's results table: how its scores read."""

from __future__ import annotations


def test_results_table_prints_fractions_in_percent_and_other_scores_as_they_are():
    """Accuracies read as %, a perplexity task's −log perplexity as it is (not ×100),
    and so does an average over it."""
    from npstune.search.report import Report, Row

    row = Row(
        "nps",
        "NPS (searched)",
        {"objective": -10.38456},
        {"objective": -10.3793, "acc/a": -10.5, "acc/b": -10.2586},
        123,
    )
    plain = Report("fusion", "mean score", ["a", "b"], [row], None, plain=["a", "b"])
    line = plain.markdown().splitlines()[-1]
    assert (
        line == "| NPS (searched) | -10.3846 | -10.3793 | -10.5000 | -10.2586 | 123 |"
    )
    mixed = Report("fusion", "mean score", ["a", "b"], [row], None, plain=["a"])
    line = mixed.markdown().splitlines()[-1]
    assert (
        line == "| NPS (searched) | -10.3846 | -10.3793 | -10.5000 | -1025.86 | 123 |"
    )
    acc = Row("nps", "NPS", {"objective": 0.8125}, {"objective": 0.5, "acc/a": 1.0}, 7)
    pct = Report("fusion", "mean acc", ["a"], [acc], None)
    assert pct.markdown().splitlines()[-1] == "| NPS | 81.25 | 50.00 | 100.00 | 7 |"
