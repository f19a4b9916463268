"""Benchmarks: one module per application table, ablations, search cost and speed.

``BENCHMARKS`` is the one table of them (``npstune bench NAME`` offers exactly these):
each name is the module ``benchmarks.NAME``, whose ``main(argv: list[str] | None)``
parses its own options, prints its table and writes
``benchmarks/results/NAME.md/.json``.
"""

BENCHMARKS: dict[str, str] = {
    "fusion": "every merge method on the zoo, test accuracy per task",
    "transfer": "prune a new task's vector on top of a merged model (H-score)",
    "compression": "storage (paper bits, bytes) against normalized accuracy",
    "ablations": (
        "Ray Tune sweeps of the fusion search (M, calibration size, k, backend)"
    ),
    "search_cost": "where a fusion search spends its time, evaluations to 99 %",
    "search_overhead": "Ray Tune overhead per trial, trials per hour",
    "speed": "NPS candidates and big-checkpoint merges against the copy floor",
    "compression_storage": "bytes on disk vs paper bits, streaming peak memory",
    "llm_fusion": "merging the LLM zoo's three SmolLM2 experts (the paper's LLM table)",
    "llm_transfer": "a new skill on the LLM zoo's base at k 0.1: grafting, tailor, NPS",
    "search_scale": (
        "a streamed NPS search over 3 experts of Llama-7B shapes: memory, build time"
    ),
}
