"""Search at scale: an NPS fusion search over a base and three experts of Llama-7B
tensor shapes, streamed, with the memory of the whole process tree measured.

The models are synthesized once into ``--scratch`` (kept for the next run): Llama-7B
shapes (hidden 4096, MLP 11008, vocabulary 32000, 32 heads) truncated to ``--layers``
decoder layers (7 by default: 1.68e9 entries per model, 3.4 GB in bf16), sharded
safetensors, each expert = base + dense noise, and a real ``LlamaForCausalLM`` config
plus a small word-level tokenizer in every directory, so ``from_pretrained`` loads any
of them.

The search is the product's: ``npstune search`` in a child process (Ray Tune, one trial
in flight at two CPUs, the cma backend), candidates on the path the memory estimate
picks (streamed here: the ranked path would need far more than this machine has), the
``causal-lm`` evaluator holding the base once in its own dtype (``dtype: auto``: bf16)
and scoring the perplexity of each candidate on a few short sequences. It reports:

- **memory**: the rise of MemTotal − MemAvailable over the run, sampled every 0.25 s.
  That counts anonymous and shared memory (Ray's object store included) once and leaves
  out the page cache of the checkpoints, which the kernel may drop. The target of the
  search-scale issue: ≤ 1.5 × one model in its dtype + 2 GB with one trial in flight.
  The peak RSS sum of the process tree is printed beside it (it counts shared pages
  once per process, and file pages too);
- **candidate build** (the trials' own ``build_s``: thresholds + θ written into the
  evaluator's model) against a **streaming floor** measured in the same run: one
  chunked read of the base and the three experts through the same reader, τ summed in
  float32 and θ written into a preallocated model of the checkpoint's dtype;
- **evaluations per hour** (trials / search wall time).

``--kill-resume`` then runs a second search of two generations, kills its driver with
SIGKILL 20 s into the second (its first candidate being built), checks what is left
(Ray processes, ``/dev/shm``, memory), and resumes it with ``--resume``: it reports
the generations lost, the finished trials the resume had to run again (those of the
unfinished generation) and that it completes.

Run: ``python -m benchmarks.search_scale [--layers 7] [--generations 3]
[--population 4] [--kill-resume] [--scratch DIR]`` (default
``benchmarks/scratch/search_scale``, gitignored). It needs about 4 × 3.4 GB of disk
and 24 GB of RAM; nothing about it is a unit test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import report

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
#: Llama-2-7B's dimensions
HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32
EXPERTS = ("alpha", "beta", "gamma")
#: the short sequences the evaluator scores (words of the tokenizer's corpus)
TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the rug",
    "a bird flew over the tree",
    "one plus two is three",
]


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    from benchmarks.speed import llama_shapes

    return llama_shapes(hidden=HIDDEN, layers=layers, inter=INTER, vocab=VOCAB)


def entries(layers: int) -> int:
    return sum(math.prod(s) for s in shapes(layers).values())


def synthesize(scratch: Path, layers: int, notes: list[str]) -> dict[str, Path]:
    """base + the experts under ``scratch`` (reused when complete)."""
    from transformers import LlamaConfig

    from benchmarks.speed import _write_model
    from tests.tiny_llm import make_tokenizer

    paths = {n: scratch / n for n in ("base", *EXPERTS)}
    done = scratch / "complete.json"
    want = {"layers": layers, "entries": entries(layers)}
    if done.is_file() and json.loads(done.read_text()) == want:
        notes.append(f"reused the synthesized models in {scratch}")
        return paths
    shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.perf_counter()
    for i, (name, p) in enumerate(paths.items()):
        print(f"synthesizing {name} ({want['entries'] / 1e9:.2f}e9 bf16)", flush=True)
        _write_model(
            p,
            shapes(layers),
            torch.bfloat16,
            seed=i,
            fine_tuned=name != "base",
            shard_bytes=2 * GIB,
            noise=0.002,
        )
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            dtype="bfloat16",
        ).save_pretrained(p)
        make_tokenizer(p)
    done.write_text(json.dumps(want))
    notes.append(
        f"synthesized 4 models of {want['entries'] / 1e9:.2f}e9 entries in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return paths


def streaming_floor(paths: dict[str, Path]) -> float:
    """Seconds for one chunked read of base + experts (τ in float32, summed) and a
    write of θ into a preallocated model in the checkpoint's dtype."""
    from npstune.taskvector import plan_merge

    plan = plan_merge(paths["base"], [paths[e] for e in EXPERTS])
    base = plan.base
    out = {k: torch.empty(base.shape(k), dtype=base.dtype(k)) for k in plan.delta_keys}
    t0 = time.perf_counter()
    for key in plan.delta_keys:
        flat = out[key].view(-1)
        for start, stop in plan.chunks(key):
            ch = plan.read_chunk(key, start, stop)
            total = ch.taus32[0].clone()
            for t in ch.taus32[1:]:
                total += t
            flat[start:stop] = (ch.base.reshape(-1).float() + total).to(flat.dtype)
    took = time.perf_counter() - t0
    del out
    return took


def _mem_used() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class MemSampler:
    """Peak of MemTotal − MemAvailable, and of the RSS sum of a process tree."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.baseline = _mem_used()
        self.peak = self.baseline
        self.tree_peak = 0
        self.root: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, root: int) -> MemSampler:
        self.root = root
        self._thread.start()
        return self

    def _tree_rss(self) -> int:
        import psutil

        try:
            p = psutil.Process(self.root)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _mem_used())
            self.tree_peak = max(self.tree_peak, self._tree_rss())
            self._stop.wait(self.period)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "baseline_gib": self.baseline / GIB,
            "rise_gib": (self.peak - self.baseline) / GIB,
            "tree_rss_peak_gib": self.tree_peak / GIB,
        }


def write_config(
    scratch: Path,
    paths: dict[str, Path],
    name: str,
    generations: int,
    population: int,
    cpus: int,
) -> Path:
    import yaml

    data = scratch / "data"
    data.mkdir(exist_ok=True)
    tasks = {}
    for i, e in enumerate(EXPERTS):
        rows = TEXTS[i:] + TEXTS[:i]
        (data / f"{e}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in rows[:2])
        )
        tasks[e] = {
            "mode": "perplexity",
            "data": {"calibration": f"{e}.jsonl", "test": f"{e}.jsonl"},
        }
    (data / "eval.yaml").write_text(
        yaml.safe_dump({"kind": "causal-lm", "dtype": "auto", "tasks": tasks})
    )
    out = scratch / "runs" / name
    cfg = {
        "name": name,
        "use": "fusion",
        "base": str(paths["base"]),
        "models": [str(paths[e]) for e in EXPERTS],
        "evaluator": str(data / "eval.yaml"),
        "nps": {"subspaces": 8, "k": {"low": 0.05, "high": 0.3}},
        "search": {"generations": generations, "population": population, "seed": 1},
        "resources": {"cpus_per_trial": cpus, "concurrency": 1},
        "tracking": {
            "uri": f"sqlite:///{ROOT / 'mlflow.db'}",
            "experiment": "npstune-benchmarks",
        },
        "report": {"baselines": [], "save_model": False},
        "output_dir": str(out),
    }
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _npstune() -> list[str]:
    exe = Path(sys.executable).with_name("npstune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "npstune"]


def _ledger(out: Path) -> Any:
    from npstune.search.monitor import Ledger

    return Ledger.load(out / "state" / "ledger.json")


def run_search_child(
    cfg: Path,
    resume: bool = False,
    kill_after: int | None = None,
    kill_delay: float = 0.0,
) -> dict[str, Any]:
    """``npstune search cfg`` in a child (its own session); memory sampled; its
    driver killed with SIGKILL ``kill_delay`` seconds after ``kill_after`` trials
    are in the ledger (which is written a generation at a time), when given."""
    import yaml

    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    cmd = [*_npstune(), "search", str(cfg), *(["--resume"] if resume else [])]
    log = cfg.with_suffix(".resume.log" if resume else ".log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    mem = MemSampler().start(proc.pid)
    killed = False
    due: float | None = None
    while proc.poll() is None:
        time.sleep(0.5)
        if kill_after is None:
            continue
        if due is None and len(_ledger(out).records) >= kill_after:
            due = time.perf_counter() + kill_delay
        if due is not None and time.perf_counter() >= due:
            os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
            proc.wait()
            killed = True
    wall = time.perf_counter() - t0
    info: dict[str, Any] = {
        "rc": proc.returncode,
        "wall_s": wall,
        "killed": killed,
        **mem.stop(),
    }
    log.close()
    info["log_tail"] = cfg.with_suffix(".resume.log" if resume else ".log").read_text()[
        -2000:
    ]
    return info


def leftovers(wait_s: float = 30.0) -> dict[str, Any]:
    """What a killed driver leaves: Ray processes, /dev/shm entries, memory."""
    import psutil

    deadline = time.time() + wait_s
    while True:
        ray = [
            p.info["name"]
            for p in psutil.process_iter(["name", "cmdline"])
            if any("ray" in (c or "") for c in (p.info["cmdline"] or [])[:2])
            and p.pid != os.getpid()
        ]
        if not ray or time.time() > deadline:
            break
        time.sleep(2.0)
    shm = sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else []
    return {"ray_processes": ray, "dev_shm": shm, "mem_used_gib": _mem_used() / GIB}


def trials_table(out: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    recs = sorted(_ledger(out).records, key=lambda r: (r.generation, r.index))
    rows = [
        {
            "generation": r.generation,
            "trial": r.index,
            "status": r.status,
            "value": r.value,
            "build_s": r.metrics.get("build_s"),
            "eval_s": r.metrics.get("eval_s"),
        }
        for r in recs
    ]
    ok = [r for r in rows if r["status"] == "ok" and r["build_s"] is not None]
    stats = {
        "trials_ok": float(len(ok)),
        "build_s_mean": sum(r["build_s"] for r in ok) / len(ok) if ok else math.nan,
        "eval_s_mean": sum(r["eval_s"] for r in ok) / len(ok) if ok else math.nan,
    }
    # the first candidate of a worker also computes the partitions and sketches
    later = [r for r in ok if (r["generation"], r["trial"]) != (0, 0)]
    stats["build_s_after_first"] = (
        sum(r["build_s"] for r in later) / len(later) if later else math.nan
    )
    return rows, stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.search_scale", description=__doc__
    )
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--scratch", default=str(ROOT / "benchmarks" / "scratch" / "search_scale")
    )
    ap.add_argument("--kill-resume", action="store_true")
    ap.add_argument("--name", default="search_scale")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    n = entries(args.layers)
    model_gib = 2 * n / GIB
    paths = synthesize(scratch, args.layers, notes)
    print("streaming floor (twice: cold, then with the page cache warm)", flush=True)
    floors = [streaming_floor(paths) for _ in range(2)]
    target = 1.5 * model_gib + 2.0
    cfg = write_config(
        scratch, paths, "search-scale", args.generations, args.population, args.cpus
    )
    shutil.rmtree(scratch / "runs" / "search-scale", ignore_errors=True)
    print(f"search: {args.generations} × {args.population} candidates", flush=True)
    info = run_search_child(cfg)
    if info["rc"] != 0:
        print(info["log_tail"], file=sys.stderr)
        raise SystemExit(f"the search failed (rc {info['rc']})")
    trials, st = trials_table(scratch / "runs" / "search-scale")
    log = cfg.with_suffix(".log").read_text()
    said = [ln.strip() for ln in log.splitlines() if "candidates: " in ln][:1]
    per_hour = 3600 * st["trials_ok"] / info["wall_s"]
    summary = [
        {
            "entries_per_model": n,
            "model_gib_bf16": model_gib,
            "tasks": len(EXPERTS),
            "trials_in_flight": 1,
            "mem_rise_gib": info["rise_gib"],
            "target_gib": target,
            "within_target": info["rise_gib"] <= target,
            "tree_rss_peak_gib": info["tree_rss_peak_gib"],
            "floor_cold_s": floors[0],
            "floor_warm_s": floors[1],
            "build_s_mean": st["build_s_mean"],
            "build_s_after_first": st["build_s_after_first"],
            "build_vs_floor": st["build_s_after_first"] / floors[1],
            "eval_s_mean": st["eval_s_mean"],
            "search_wall_s": info["wall_s"],
            "evals_per_hour": per_hour,
        }
    ]
    notes += said
    notes.append(
        "mem_rise_gib: peak rise of MemTotal − MemAvailable over the search (driver, "
        "Ray, the trial and its model; the checkpoints' page cache left out); "
        f"target 1.5 × {model_gib:.2f} GiB + 2 GiB = {target:.2f} GiB"
    )
    notes.append(
        "build_vs_floor: the trials' mean build time after the first candidate (which "
        "also computes the partitions and sketches) over the warm floor"
    )
    sections: dict[str, list[dict[str, Any]]] = {"summary": summary, "trials": trials}
    if args.kill_resume:
        sections["kill -9 and resume"] = [kill_resume(scratch, paths, args)]
    report(
        args.name,
        sections,
        meta={
            "layers": args.layers,
            "generations": args.generations,
            "population": args.population,
            "cpus_per_trial": args.cpus,
        },
        notes=notes,
        started=started,
        metrics={
            k: float(v)
            for k, v in summary[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
    )


def kill_resume(
    scratch: Path, paths: dict[str, Path], args: argparse.Namespace
) -> dict[str, Any]:
    """SIGKILL the driver inside its second generation (a few seconds into its
    first trial, whose candidate is being built), check what is left, resume."""
    gens = min(args.generations, 2)  # killed in its second generation
    cfg = write_config(
        scratch, paths, "search-scale-kill", gens, args.population, args.cpus
    )
    out = scratch / "runs" / "search-scale-kill"
    shutil.rmtree(out, ignore_errors=True)
    pop = args.population
    delay = 20.0
    print(f"kill -9 test: the driver dies {delay:.0f} s into generation 2", flush=True)
    before = _mem_used() / GIB
    first = run_search_child(cfg, kill_after=pop, kill_delay=delay)
    at_kill = _ledger(out)
    done_gens = len(at_kill.generations)
    left = leftovers()
    print(f"left after the kill: {left}", flush=True)
    second = run_search_child(cfg, resume=True)
    end = _ledger(out)
    return {
        "killed": first["killed"],
        "generations_finished_at_kill": done_gens,
        "trials_recorded_at_kill": len(at_kill.records),
        # finished trials of the unfinished generation: the resume runs them again
        "trials_rerun": len(at_kill.records) - done_gens * pop,
        "generations_lost": gens - done_gens if first["killed"] else 0,
        "ray_processes_left": len(left["ray_processes"]),
        "dev_shm_left": len(left["dev_shm"]),
        "mem_used_before_gib": before,
        "mem_used_after_kill_gib": left["mem_used_gib"],
        "resume_rc": second["rc"],
        "resume_mem_rise_gib": second["rise_gib"],
        "generations_at_end": len(end.generations),
        "trials_at_end": len(end.records),
        "trials_expected": gens * pop,
    }


if __name__ == "__main__":
    main()
