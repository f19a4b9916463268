"""Speed and scale: NPS candidates against the memory-copy floor, merges of big
checkpoints.

Parts (``--parts``, default ``candidates,peer``; ``scale`` takes tens of minutes and ~60
GB of disk):

- ``candidates``: at 22M, 87M (ViT-B/32 scale) and 350M entries, on the same τ, time
  (a) the floor: one memory copy of τ into the output buffer; (b) the straightforward
  sort-per-candidate NPS build (reweight, stable sort, scatter); (c) our build
  (:class:`~npstune.sparsify.ranked.RankedTaskVector`: O(M log n) threshold + scatter).
  Reports b/c and c/a.
- ``peer``: a Llama-shaped fp32 checkpoint (~438M parameters, 500 MB shards, random init
  written tensor by tensor) + two noisy fine-tuned copies; ``npstune merge --method M``
  (each method's defaults) for every M of :data:`PEER_METHODS` (``task-arithmetic``,
  ``ties`` (global), ``nps`` and the newer ``tsv-m``, ``iso-c``, ``iso-cts``,
  ``wudi`` (at 4 and 12 steps, extrapolated to its 400), ``emr``, ``pcb``;
  ``--peer-methods`` picks others) against a floor that reads the three models and
  writes one with safetensors, tensor by tensor; mergekit when installed.
  Wall time, peak RSS and CPU time of each child process, against the floor and
  against TIES of the same run, and how many cores other processes kept busy
  meanwhile. A run past ``--peer-timeout`` seconds (default 1800) is killed and its
  row marked timed out (rc 124); every output (EMR's one checkpoint per task too) is
  deleted after its run.
- ``scale``: a sharded bf16 checkpoint set of up to 7·10⁹ entries per model (base + 2
  fine-tuned; the largest size the disk holds, at least 2·10⁹), then ``npstune merge
  --method ties``, ``--method nps`` and ``npstune compress``; wall time and peak RSS.

Run: ``python -m benchmarks.speed [--parts candidates,peer,scale]`` or ``npstune bench
speed``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, report, timeit
from npstune.sparsify.ranked import RankedTaskVector

NAME = "speed"
M = 8
K_RATIO = 0.05


# --------------------------------------------------------------------------- candidates
def _sort_per_candidate(
    tau: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, k: float, out: torch.Tensor
) -> torch.Tensor:
    """The reference build: reweight, one stable sort per candidate, scatter."""
    n = tau.numel()
    K = -(-int(round(k * n * 1e6)) // 1_000_000)  # ⌈k·n⌉ for the decimal k used here
    rew_w = w[ids.long()]
    rew = rew_w * tau.abs()
    idx = torch.sort(rew, descending=True, stable=True).indices[:K]
    out.zero_()
    out[idx] = rew_w[idx] * tau[idx]
    return out


def _our_build(
    r: RankedTaskVector, w: torch.Tensor, k: float, out: torch.Tensor
) -> torch.Tensor:
    out.zero_()
    r.scatter_into(out, w, k)
    return out


def candidates(sizes: list[int], device: str = "cpu") -> list[dict[str, Any]]:
    """Rows of the candidate-build table on ``device`` (τ drawn on the CPU,
    then moved)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        tau = (torch.randn(n, generator=g) * torch.rand(n, generator=g)).to(
            dev
        )  # heavy-ish tails
        out = torch.empty(n, device=dev)
        if sync:
            sync()
        t0 = time.perf_counter()
        r = RankedTaskVector({"tau": tau}, M, device=dev)
        if sync:
            sync()
        precompute = time.perf_counter() - t0
        ids = torch.empty(
            n, dtype=torch.uint8, device=dev
        )  # subspace ids for the reference path
        for m, (lo, hi) in enumerate(r.bounds):
            ids[r.positions[lo:hi]] = m
        w = torch.rand(M, generator=g) * 2
        # the lambdas bind this iteration's tensors: the loop ends with ``del`` of them
        floor = timeit(lambda out=out, tau=tau: out.copy_(tau), repeat=5, sync=sync)
        ours = timeit(
            lambda r=r, w=w, out=out: _our_build(r, w, K_RATIO, out),
            repeat=5,
            sync=sync,
        )
        mine = out.clone()
        thresh = timeit(lambda r=r, w=w: r.threshold(w, K_RATIO), repeat=5, sync=sync)
        on_cpu = (
            dev.type == "cpu"
        )  # a CPU sort of >1e8 entries takes a minute: time it once
        ref = timeit(
            lambda tau=tau, ids=ids, w=w, out=out: _sort_per_candidate(
                tau, ids, w.to(dev), K_RATIO, out
            ),
            repeat=1 if on_cpu and n > 10**8 else 3,
            warmup=0 if on_cpu else 1,
            sync=sync,
        )
        exact = bool(torch.equal(mine, out))
        rows.append(
            {
                "entries": f"{n / 1e6:.0f}M",
                "floor_copy_s": floor,
                "sort_per_candidate_s": ref,
                "ours_s": ours,
                "threshold_ms": thresh * 1e3,
                "precompute_s": precompute,
                "b_over_c": ref / ours,
                "c_over_a": ours / floor,
                "identical": exact,
            }
        )
        print(rows[-1], flush=True)
        del tau, out, r, ids, mine
        gc.collect()
    return rows


# ---------------------------------------------------------------------- subprocess runs
#: runs argv[2:] as its child, waits at most argv[1] seconds (0: no limit; a child past
#: it is killed and reaped, so its peak RSS until then still counts) and prints one JSON
#: line: rc (124 when killed), wall_s, rss_mib, cpu_s (the child's user + system time),
#: timed_out
_WRAPPER = """
import json, resource, subprocess, sys, time
limit = float(sys.argv[1]) or None
t = time.perf_counter()
try:
    rc, timed_out = subprocess.call(sys.argv[2:], timeout=limit), False
except subprocess.TimeoutExpired:
    rc, timed_out = 124, True
w = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": w, "rss_mib": ru.ru_maxrss / 1024,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "timed_out": timed_out}))
"""


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat:
    user, nice, system, irq, softirq, steal), None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in fields[:8]
        )
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def _child_rss_mib(pid: int) -> float | None:
    """Current RSS of the children of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        kb = 0
        for kid in kids:
            for line in Path(f"/proc/{kid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        return kb / 1024
    except (OSError, ValueError):
        return None


#: a tqdm progress bar's count: "... | 31/264 [01:23<..."
_PROGRESS = re.compile(r"\|\s*(\d+)/(\d+) \[")


def _progress(err: str) -> str | None:
    """``done/total`` of the last progress-bar update in ``err`` (None: no bar)."""
    found = _PROGRESS.findall(err)
    return f"{found[-1][0]}/{found[-1][1]}" if found else None


def _last_message(err: str) -> str:
    """The last line of ``err`` that is not a progress-bar update."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", err)]
    lines = [ln for ln in lines if ln and not _PROGRESS.search(ln)]
    return (lines or ["?"])[-1][:200]


def _this_checkout() -> dict[str, str]:
    """PYTHONPATH that makes a child import this checkout's npstune (the console script
    otherwise imports whatever tree an editable install of the environment points at,
    which may be another worktree)."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": root + (os.pathsep + rest if rest else "")}


def _run_measured(
    cmd: list[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    label: str = "",
    heartbeat: float = 60.0,
) -> dict[str, Any]:
    """Run ``cmd`` as a child, return wall time and its peak RSS (from the OS).

    ``timeout`` (seconds): a child still running then is killed and the result has
    ``timed_out`` True, rc 124 and the peak RSS it reached. Every ``heartbeat`` seconds
    a line with the elapsed time, the child's current RSS and, when the child draws a
    tqdm bar on stderr, its count is printed (``label``); ``progress`` is the bar's last
    count: how far a timed-out run got, at least (tqdm redraws at intervals).
    ``others_cores``: the cores that other processes kept busy on average meanwhile
    (the machine's busy CPU time less the child's, over the wall time)."""
    busy0 = _busy_cpu_s()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(float(timeout or 0)), *cmd],
            stdout=subprocess.PIPE,
            stderr=errf,  # a file: read while the child runs without a pipe to drain
            text=True,
            env={**os.environ, **_this_checkout(), **(env or {})},
            start_new_session=True,  # the backstop below kills the wrapper and child
        )

        def err_tail(size: int = 1 << 14) -> str:
            # pread: the child shares this file's offset, which must not move
            end = os.fstat(errf.fileno()).st_size
            tail = os.pread(errf.fileno(), size, max(0, end - size))
            return tail.decode(errors="replace")

        t0 = time.perf_counter()
        killed = False
        while True:
            try:
                stdout, _ = proc.communicate(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.perf_counter() - t0
                if timeout and elapsed > timeout + 120:  # the wrapper did not end it
                    os.killpg(proc.pid, signal.SIGKILL)
                    stdout, _ = proc.communicate()
                    killed = True
                    break
                rss = _child_rss_mib(proc.pid)
                mem = "" if rss is None else f", RSS {rss:.0f} MiB"
                done = _progress(err_tail())
                bar = "" if done is None else f", ≥ {done} tensors"
                print(
                    f"  {label or cmd[0]}: running, {elapsed:.0f} s{mem}{bar}",
                    flush=True,
                )
        err = err_tail()
    last = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    try:
        info = json.loads(last)
    except json.JSONDecodeError:
        info = {"rc": 124, "timed_out": True} if killed else {"rc": proc.returncode}
    busy1 = _busy_cpu_s()
    wall, cpu = info.get("wall_s"), info.get("cpu_s")
    if busy0 is not None and busy1 is not None and wall and cpu is not None:
        info["others_cores"] = max(0.0, (busy1 - busy0 - cpu) / wall)
    if _progress(err) is not None:
        info["progress"] = _progress(err)
    if info.get("rc") and not info.get("timed_out"):
        info["error"] = _last_message(err)
    return info


def _npstune() -> list[str]:
    """The npstune command: the console script beside this Python,
    else ``python -m npstune``."""
    exe = Path(sys.executable).parent / "npstune"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "npstune"]


FLOOR = """
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, a, b, out = map(Path, sys.argv[1:5])
idx = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
out.mkdir(exist_ok=True)
for shard in sorted(set(idx.values())):
    res = {}
    with (
        safe_open(base / shard, "pt") as fb,
        safe_open(a / shard, "pt") as fa,
        safe_open(b / shard, "pt") as fc,
    ):
        for k in fb.keys():
            x = fb.get_tensor(k); y = fa.get_tensor(k); z = fc.get_tensor(k)
            res[k] = x + 0.5 * ((y - x) + (z - x))
            del x, y, z
    save_file(res, str(out / shard))
"""


def _write_model(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    seed: int,
    fine_tuned: bool,
    shard_bytes: int,
    noise: float = 0.01,
) -> None:
    """Write a sharded safetensors model tensor by tensor
    (fine-tuned = base + noise)."""
    from npstune.checkpoints.io import SAFETENSORS_INDEX
    from npstune.checkpoints.safetensors_format import StreamingSafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{}]
    size = 0
    item = torch.empty((), dtype=dtype).element_size()
    for k in sorted(shapes):
        nb = item * int(torch.tensor(shapes[k]).prod())
        if groups[-1] and size + nb > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = (shapes[k], dtype)
        size += nb
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    for i, specs in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        w = StreamingSafetensorsWriter(folder / name, specs)
        for k, (shape, dt) in specs.items():
            n = int(torch.tensor(shape).prod())
            step = 1 << 24
            for s in range(0, n, step):
                e = min(n, s + step)
                # the base's values are a function of (key, offset), so every model
                # regenerates them instead of reading the base back
                seed_ks = zlib.crc32(f"{k}:{s}".encode())
                chunk = (
                    torch.randn(e - s, generator=torch.Generator().manual_seed(seed_ks))
                    * 0.02
                )
                if fine_tuned:
                    chunk += noise * torch.randn(e - s, generator=g)
                w.write(k, chunk.to(dt), s)
        w.close()
        weight_map.update({k: name for k in specs})
    (folder / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def llama_shapes(
    hidden: int, layers: int, inter: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-architecture model
    (what transformers' LlamaConfig builds)."""
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        s[p + "mlp.gate_proj.weight"] = (inter, hidden)
        s[p + "mlp.up_proj.weight"] = (inter, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, inter)
        s[p + "input_layernorm.weight"] = (hidden,)
        s[p + "post_attention_layernorm.weight"] = (hidden,)
    return s


#: the merge runs of the peer part (``--peer-methods`` picks others): the two
#: baselines and NPS (its defaults: M 8, w 1), then the newer methods, each with its
#: defaults, written ``METHOD`` or ``METHOD:NAME=VALUE[:NAME=VALUE...]`` (passed as
#: ``--param NAME=VALUE``). WUDI runs at 4 and 12 Adam steps: its default 400 take
#: about 2.6 hours on 2 CPU cores (one X·G product per matrix per step), so
#: :func:`extrapolate_steps` adds the 400-step row from the two measured ones (time is
#: linear in the steps; memory does not depend on them).
PEER_METHODS = (
    "task-arithmetic",
    "ties",
    "nps",
    "tsv-m",
    "iso-c",
    "iso-cts",
    "wudi:steps=4",
    "wudi:steps=12",
    "emr",
    "pcb",
)
#: seconds one peer merge may run before it is killed and its row marked timed out
PEER_TIMEOUT = 1800.0
#: the columns of the peer table, in order (every row has each, None when it does not
#: apply)
PEER_COLUMNS = (
    "tool",
    "rc",
    "wall_s",
    "rss_mib",
    "time_vs_floor",
    "rss_vs_floor",
    "time_vs_ties",
    "rss_vs_ties",
    "cpu_s",
    "others_cores",
    "note",
)


def _peer_row(tool: str, info: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One peer-table row from a :func:`_run_measured` result (a timed-out run keeps
    its peak RSS, not its wall time; failures and time-outs say so in ``note``)."""
    row: dict[str, Any] = dict.fromkeys(PEER_COLUMNS)
    row.update(
        tool=tool,
        rc=info.get("rc"),
        wall_s=info.get("wall_s"),
        rss_mib=info.get("rss_mib"),
        cpu_s=info.get("cpu_s"),
        others_cores=info.get("others_cores"),
    )
    if info.get("timed_out"):
        row["wall_s"] = None
        got = info.get("progress")
        row["note"] = (
            f"timed out: killed after {timeout:.0f} s (--peer-timeout)"
            + (
                f" with at least {got} tensors done (the bar's last update)"
                if got
                else ""
            )
            + "; rss_mib is its peak until then"
        )
    elif info.get("rc"):
        row["note"] = f"failed: {info.get('error', '?')}"
    return row


def method_spec(spec: str) -> tuple[str, list[str]]:
    """``METHOD[:NAME=VALUE...]`` as (method, ["NAME=VALUE", ...])."""
    method, *params = spec.split(":")
    return method, params


def _tool(spec: str) -> str:
    """The table's name of one peer run: ``npstune wudi (steps=4)``."""
    method, params = method_spec(spec)
    return f"npstune {method}" + (f" ({', '.join(params)})" if params else "")


def extrapolate_steps(
    rows: list[dict[str, Any]], specs: list[str]
) -> list[dict[str, Any]]:
    """For a method run at two or more ``steps=S`` (and nothing else set), one row at
    its default steps: wall and CPU time on the line through the two largest measured
    step counts, RSS the larger measured peak (an iterative method's memory does not
    grow with its steps). Marked as extrapolated in ``note``."""
    from npstune.merge.registry import get_method

    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for spec, row in zip(specs, rows, strict=True):
        method, params = method_spec(spec)
        if len(params) == 1 and params[0].startswith("steps=") and row["rc"] == 0:
            by_method.setdefault(method, []).append((int(params[0][6:]), row))
    out = []
    for method, runs in by_method.items():
        runs = sorted({s: r for s, r in runs}.items())
        if len(runs) < 2:
            continue
        field = get_method(method).params.model_fields.get("steps")
        if field is None or not isinstance(field.default, int):
            continue
        n = field.default
        (s1, a), (s2, b) = runs[-2:]
        row: dict[str, Any] = dict.fromkeys(PEER_COLUMNS)
        row.update(tool=f"npstune {method} (steps={n}, extrapolated)", rc=0)
        for col in ("wall_s", "cpu_s"):
            if a[col] is not None and b[col] is not None:
                row[col] = a[col] + (n - s1) * (b[col] - a[col]) / (s2 - s1)
        row["rss_mib"] = max(a["rss_mib"], b["rss_mib"])
        row["note"] = (
            f"not measured: time on the line through steps={s1} and steps={s2} "
            f"({(b['wall_s'] - a['wall_s']) / (s2 - s1):.1f} s per step), RSS their "
            "larger peak"
        )
        out.append(row)
    return out


def _ratios(rows: list[dict[str, Any]]) -> None:
    """time/rss against the floor (row 0) and against TIES, for the runs that
    finished."""
    ties = next((r for r in rows if r["tool"] == "npstune ties" and r["rc"] == 0), {})
    for r in rows:
        if r["rc"] != 0 or not r["wall_s"]:
            continue
        for ref, suffix in ((rows[0], "floor"), (ties, "ties")):
            if ref.get("rc") == 0 and ref.get("wall_s") and ref.get("rss_mib"):
                r[f"time_vs_{suffix}"] = r["wall_s"] / ref["wall_s"]
                r[f"rss_vs_{suffix}"] = r["rss_mib"] / ref["rss_mib"]


def peer(
    scratch: Path,
    shapes: dict[str, tuple[int, ...]] | None = None,
    device: str = "cpu",
    methods: tuple[str, ...] | list[str] = PEER_METHODS,
    timeout: float | None = PEER_TIMEOUT,
    notes: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    mergekit: bool = True,
) -> list[dict[str, Any]]:
    """The peer table: the floor, ``npstune merge --method M`` for each of
    ``methods`` (defaults of each; ``--out`` removed after each run), mergekit when
    installed and ``mergekit``. ``timeout`` seconds per run (None: no limit); the
    models are written in ``dtype``."""
    shapes = shapes or llama_shapes(
        hidden=1024, layers=29, inter=2816, vocab=32000
    )  # 438M
    total = sum(int(torch.tensor(v).prod()) for v in shapes.values())
    print(f"peer workload: {total / 1e6:.0f}M {dtype} parameters", flush=True)
    paths = {n: scratch / n for n in ("base", "ft_a", "ft_b")}
    t0, made = time.perf_counter(), 0
    for i, (n, p) in enumerate(paths.items()):
        if not (p / "model.safetensors.index.json").exists():
            _write_model(
                p,
                shapes,
                dtype,
                seed=i,
                fine_tuned=n != "base",
                shard_bytes=500 * 2**20,
            )
            made += 1
    if notes is not None:
        if made:
            notes.append(
                f"synthesized {made} model(s) in {time.perf_counter() - t0:.0f} s"
            )
        if made < 3:
            notes.append(f"reused {3 - made} synthesized model(s) found in {scratch}")
    rows = []
    floor_out = scratch / "floor_out"
    shutil.rmtree(floor_out, ignore_errors=True)
    print("peer: floor (read 3, write 1)", flush=True)
    floor = _run_measured(
        [
            sys.executable,
            "-c",
            FLOOR,
            str(paths["base"]),
            str(paths["ft_a"]),
            str(paths["ft_b"]),
            str(floor_out),
        ],
        timeout=timeout,
        label="floor",
    )
    rows.append(_peer_row("floor (read 3, write 1; safetensors)", floor, timeout))
    print(rows[-1], flush=True)
    shutil.rmtree(floor_out, ignore_errors=True)
    exe = _npstune()
    for i, spec in enumerate(methods, 1):
        method, params = method_spec(spec)
        # emr writes one checkpoint per task into the directory --out: all of it goes
        out = scratch / f"out_{method}"
        shutil.rmtree(out, ignore_errors=True)
        limit = "no time limit" if not timeout else f"timeout {timeout:.0f} s"
        print(f"peer: {_tool(spec)} ({i}/{len(methods)}, {limit})", flush=True)
        info = _run_measured(
            [
                *exe,
                "merge",
                "--method",
                method,
                "--base",
                str(paths["base"]),
                "--models",
                str(paths["ft_a"]),
                str(paths["ft_b"]),
                "--out",
                str(out),
                "--device",
                device,
                *(a for p in params for a in ("--param", p)),
            ],  # no --quiet: the progress bar (on stderr) tells how far a run got
            timeout=timeout,
            label=method,
        )
        rows.append(_peer_row(_tool(spec), info, timeout))
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
        # a run killed at its timeout leaves its writer's staging directory beside out
        for staging in scratch.glob(f".{out.name}.*npstune-tmp*"):
            shutil.rmtree(staging, ignore_errors=True)
    if mergekit and shutil.which("mergekit-yaml"):
        cfg = scratch / "mk.yaml"
        cfg.write_text(
            f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
            f"  - model: {paths['ft_a']}\n"
            "    parameters: {density: 0.2, weight: 1.0}\n"
            f"  - model: {paths['ft_b']}\n"
            "    parameters: {density: 0.2, weight: 1.0}\n"
            "parameters: {normalize: true}\ndtype: float32\n"
        )
        mk_out = scratch / "mk_out"
        info = _run_measured(
            ["mergekit-yaml", str(cfg), str(mk_out), "--lazy-unpickle"],
            timeout=timeout,
            label="mergekit",
        )
        rows.append(_peer_row("mergekit ties", info, timeout))
        shutil.rmtree(mk_out, ignore_errors=True)
        cfg.unlink(missing_ok=True)
    rows += extrapolate_steps(rows[1 : 1 + len(methods)], list(methods))
    _ratios(rows)
    return rows


# ---------------------------------------------------------------------------- engine
#: the merge engine's methods, each timed on every layout and dtype against the floor
ENGINE_METHODS = ("task-arithmetic", "ties", "nps", "dare", "consensus-ta")
#: the peer-table columns the engine table keeps
ENGINE_COLUMNS = (
    "tool",
    "rc",
    "wall_s",
    "time_vs_floor",
    "time_vs_ties",
    "rss_mib",
    "cpu_s",
    "others_cores",
    "note",
)
#: entries per model of each engine layout (about 150M, 600 MB in fp32)
ENGINE_ENTRIES = 150_000_000


def engine_layouts(
    entries: int = ENGINE_ENTRIES,
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The two tensor layouts of the engine part, each of about ``entries`` entries:
    ``many`` (tensors of 256×256, as a model of many small layers) and ``few``
    (tensors of 25M entries, 5000×5000, as embeddings and big projections; smaller
    squares, at least four, when ``entries`` is under 100M)."""
    import math

    side = min(5000, math.isqrt(max(1, entries // 4)))
    small, big = (256, 256), (side, side)
    n_small = max(1, entries // (small[0] * small[1]))
    n_big = max(1, entries // (big[0] * big[1]))
    return {
        "many": {f"layers.{i:05d}.weight": small for i in range(n_small)},
        "few": {f"blocks.{i:03d}.weight": big for i in range(n_big)},
    }


def engine(
    scratch: Path,
    methods: tuple[str, ...] | list[str] = ENGINE_METHODS,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    entries: int = ENGINE_ENTRIES,
    timeout: float | None = PEER_TIMEOUT,
    notes: list[str] | None = None,
    keep: bool = False,
) -> list[dict[str, Any]]:
    """Every method of ``methods`` on every layout and dtype: the peer table's runs
    (``npstune merge`` in a child process, against the floor measured just before on
    the same files), one (layout, dtype) at a time, its models deleted after it
    unless ``keep``."""
    rows: list[dict[str, Any]] = []
    for layout, shapes in engine_layouts(entries).items():
        for dt in dtypes:
            work = scratch / f"{layout}-{dt}"
            print(f"engine: {layout} layout, {dt}", flush=True)
            got = peer(
                work,
                shapes,
                methods=methods,
                timeout=timeout,
                notes=notes,
                dtype=getattr(torch, dt),
                mergekit=False,
            )
            shape = "×".join(map(str, next(iter(shapes.values()))))
            label = f"{layout} ({len(shapes)} × {shape})"
            n = sum(int(torch.tensor(v).prod()) for v in shapes.values())
            rows += [
                {
                    "layout": label,
                    "dtype": dt,
                    "entries": n,
                    **{c: r.get(c) for c in ENGINE_COLUMNS},
                }
                for r in got
            ]
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- scale
def scale(
    scratch: Path, target: int = 7 * 10**9
) -> tuple[list[dict[str, Any]], list[str]]:
    notes = []
    scratch.mkdir(parents=True, exist_ok=True)
    paths = {nm: scratch / nm for nm in ("base", "ft_a", "ft_b")}
    if all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        total = _entries(paths["base"])
        notes.append(
            f"reused the synthesized models found in {scratch} "
            f"({total / 1e9:.2f}e9 bf16 entries each)"
        )
        return _scale_runs(scratch, paths, total, notes)
    free = shutil.disk_usage(scratch).free
    # base + 2 fine-tuned + one output at a time (deleted after each run) + compress
    # store (~0.15 model): ~4.3 models of bf16
    fits = int(free * 0.85 / (4.3 * 2))
    n = min(target, fits)
    if target < 7 * 10**9:
        notes.append(
            f"scale run asked for {target / 1e9:.2f}e9 entries per model "
            f"(--scale-entries); tensors have 7B-model shapes (hidden 4096, "
            f"MLP 11008, vocab 32000), so peak memory is that of a 7B merge"
        )
    if n < target:
        notes.append(
            f"disk holds {free / 2**30:.0f} GiB free: scale run uses {n / 1e9:.2f}e9 "
            f"entries per model instead of {target / 1e9:.0f}e9"
        )
    if n < 2 * 10**9:
        notes.append("not enough disk for the 2e9-entry minimum; scale run skipped")
        return [], notes
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, (n - 2 * vocab * hidden - hidden) // per_layer)
    shapes = llama_shapes(hidden, layers, inter, vocab)
    total = sum(int(torch.tensor(v).prod()) for v in shapes.values())
    t0 = time.perf_counter()
    made = 0
    for i, (nm, p) in enumerate(paths.items()):
        if not (p / "model.safetensors.index.json").exists():
            _write_model(
                p,
                shapes,
                torch.bfloat16,
                seed=i,
                fine_tuned=nm != "base",
                shard_bytes=4 * 2**30,
                noise=0.002,
            )
            made += 1
    notes.append(
        f"synthesized {made} × {total / 1e9:.2f}e9 bf16 entries in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    if made < 3:
        notes.append(f"reused {3 - made} synthesized model(s) found in {scratch}")
    return _scale_runs(scratch, paths, total, notes)


def _entries(folder: Path) -> int:
    from npstune.checkpoints import open_checkpoint

    ck = open_checkpoint(folder)
    return sum(ck.numel(k) for k in ck.keys())


def _scale_runs(
    scratch: Path, paths: dict[str, Path], total: int, notes: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """TIES merge, NPS merge and compress of the synthesized models: wall time,
    peak RSS."""
    print(f"scale workload: {total / 1e9:.2f}e9 bf16 entries per model", flush=True)
    exe = _npstune()
    rows = []
    models = [str(paths["ft_a"]), str(paths["ft_b"])]
    for label, cmd in [
        (
            "merge ties",
            [
                *exe,
                "merge",
                "--method",
                "ties",
                "--base",
                str(paths["base"]),
                "--models",
                *models,
            ],
        ),
        (
            "merge nps",
            [
                *exe,
                "merge",
                "--method",
                "nps",
                "--base",
                str(paths["base"]),
                "--models",
                *models,
            ],
        ),
        (
            "compress",
            [*exe, "compress", "--base", str(paths["base"]), "--models", *models],
        ),
    ]:
        out = scratch / ("out_" + label.replace(" ", "_"))
        info = _run_measured(
            [*cmd, "--out", str(out)] + (["--quiet"] if "merge" in label else [])
        )
        rows.append({"run": label, "entries_per_model": f"{total / 1e9:.2f}e9", **info})
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows, notes


PARTS = ("candidates", "peer", "engine", "scale")


def _notes_by_part(notes: list[str]) -> dict[str, list[str]]:
    """Sort the flat notes of an older results file by part (targets are rewritten)."""
    out: dict[str, list[str]] = {}
    for n in notes:
        label = next((p for p in PARTS if n.startswith(p + ": ")), None)
        if label:
            out.setdefault(label, []).append(n[len(label) + 2 :])
        elif n.startswith("candidate"):
            out.setdefault("candidates", []).append(n)
        elif not n.startswith("targets"):
            out.setdefault("scale", []).append(n)
    return out


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed")
    ap.add_argument("--parts", default="candidates,peer")
    ap.add_argument("--sizes", default="22000000,87000000,350000000")
    ap.add_argument(
        "--scratch", default=None, help="where synthetic checkpoints go (deleted)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch checkpoints")
    ap.add_argument(
        "--zoo", default=None, help="unused (the speed benchmark is synthetic)"
    )
    ap.add_argument(
        "--scale-entries",
        type=float,
        default=7e9,
        help="entries per model of the scale part (default 7e9; the disk may "
        "lower it, to no less than 2e9)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the candidates part runs (cpu, cuda, cuda:N); its table is "
        "kept per device",
    )
    ap.add_argument(
        "--peer-shape",
        default="1024,29,2816,32000",
        help="hidden,layers,intermediate,vocab of the peer part's Llama shapes "
        "(default: 438M parameters)",
    )
    ap.add_argument(
        "--peer-methods",
        default=",".join(PEER_METHODS),
        help="comma-separated merge runs of the peer part, METHOD or "
        "METHOD:NAME=VALUE[:NAME=VALUE...] (passed as --param NAME=VALUE); a method "
        "run at two steps=S gets a row extrapolated to its default steps (default: "
        f"{','.join(PEER_METHODS)})",
    )
    ap.add_argument(
        "--engine-methods",
        default=",".join(ENGINE_METHODS),
        help="comma-separated merge runs of the engine part, as --peer-methods "
        f"(default: {','.join(ENGINE_METHODS)})",
    )
    ap.add_argument(
        "--engine-entries",
        type=float,
        default=ENGINE_ENTRIES,
        help=f"entries per model of each engine layout (default {ENGINE_ENTRIES:.0e})",
    )
    ap.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT,
        help="seconds one peer run may take before it is killed and its row marked "
        f"timed out (default {PEER_TIMEOUT:.0f}; 0: no limit)",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="results dir (default benchmarks/results)",
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(
            f"unknown --parts {', '.join(sorted(unknown))} (choose from "
            f"{', '.join(PARTS)})"
        )
    try:
        hidden, layers, inter, vocab = (int(x) for x in args.peer_shape.split(","))
    except ValueError:
        ap.error(
            "--peer-shape wants four integers hidden,layers,intermediate,vocab, got "
            f"{args.peer_shape!r}"
        )
    peer_methods = [m for m in args.peer_methods.split(",") if m]
    engine_methods = [m for m in args.engine_methods.split(",") if m]
    for label, chosen in (("peer", peer_methods), ("engine", engine_methods)):
        if label not in parts:
            continue
        from npstune.merge.registry import method_names

        known = method_names()
        bad = [m for m in chosen if method_spec(m)[0] not in known]
        if bad or not chosen:
            ap.error(
                f"unknown --{label}-methods {', '.join(bad) or '(none given)'} "
                f"(choose from {', '.join(known)})"
            )
    if args.peer_timeout < 0:
        ap.error(f"--peer-timeout wants seconds >= 0, got {args.peer_timeout}")
    out_dir = args.out_dir or RESULTS
    # tables of a GPU run go to speed-cuda.md: one machine's facts per results file
    name = NAME if args.device == "cpu" else f"{NAME}-{args.device.split(':')[0]}"
    previous = out_dir / f"{name}.json"
    sections: dict[str, Any] = {}
    part_notes: dict[
        str, list[str]
    ] = {}  # part -> its notes, replaced when the part re-runs
    if previous.exists():  # keep the sections (and notes) of parts not re-run
        old = json.loads(previous.read_text())
        sections.update(old.get("sections", {}))
        part_notes = old.get("part_notes") or _notes_by_part(old.get("notes", []))
    scratch_root = Path(
        args.scratch or tempfile.mkdtemp(prefix="npstune-speed-", dir="/tmp")
    )
    scratch_root.mkdir(parents=True, exist_ok=True)

    def part(label: str, fn: Any) -> None:
        """Run one part; a failure is recorded and the other parts still run."""
        if label not in parts:
            return
        notes = part_notes[label] = [
            f"ran {time.strftime('%Y-%m-%d %H:%M')} at commit {_git_commit()}; 1-min "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores when it "
            "started"
        ]
        try:
            fn(notes)
        except Exception as exc:  # noqa: BLE001 - keep what the other parts measured
            notes.append(f"failed: {type(exc).__name__}: {exc}")
            print(f"part {label} failed: {exc}", flush=True)

    def run_candidates(notes: list[str]) -> None:
        from npstune.runtime import resolve_device

        sizes = [int(s) for s in args.sizes.split(",")]
        dev = resolve_device(args.device)
        title = "NPS candidate build (M=8, k=0.05)"
        if dev.type == "cuda":
            title += f" on {torch.cuda.get_device_name(dev)}"
        sections[title] = candidates(sizes, str(dev))

    def run_peer(notes: list[str]) -> None:
        shapes = llama_shapes(hidden=hidden, layers=layers, inter=inter, vocab=vocab)
        params = sum(int(torch.tensor(v).prod()) for v in shapes.values())
        title = f"Peer workload: Llama-shaped {params / 1e6:.0f}M fp32, 2 fine-tuned"
        if args.device != "cpu":
            title += f" (npstune --device {args.device})"
        notes.append(
            "time_vs_ties / rss_vs_ties: against npstune ties of this run; cpu_s: the "
            "child's user + system CPU time; others_cores: cores kept busy by other "
            "processes during the run, on average (machine busy time less the "
            "child's, over wall_s); timed-out rows (rc 124) keep their peak RSS only"
        )
        rows = peer(
            scratch_root / "peer",
            shapes,
            device=args.device,
            methods=peer_methods,
            timeout=args.peer_timeout or None,
            notes=notes,
        )
        for old_title in [t for t in sections if t.startswith("Peer workload")]:
            del sections[old_title]  # one peer table per results file: this run's
        sections[title] = rows

    def run_engine(notes: list[str]) -> None:
        notes.append(
            "every engine method with its defaults (ties, nps: global scope) on "
            "each layout and dtype, base + 2 fine-tuned (noise 0.01), each run "
            "against the floor measured just before it on the same files; targets: "
            "time_vs_floor ≤ 2 for every method, nps ≤ 1.5 × ties"
        )
        sections["Engine: every method against the floor, per layout and dtype"] = (
            engine(
                scratch_root / "engine",
                methods=engine_methods,
                entries=int(args.engine_entries),
                timeout=args.peer_timeout or None,
                notes=notes,
                keep=args.keep,
            )
        )

    def run_scale(notes: list[str]) -> None:
        rows, scale_notes = scale(scratch_root / "scale", int(args.scale_entries))
        sections["Scale: sharded bf16, base + 2 fine-tuned"] = rows
        notes.extend(scale_notes)

    try:
        part("candidates", run_candidates)
        part("peer", run_peer)
        part("engine", run_engine)
        part("scale", run_scale)
    finally:
        if not args.keep:
            shutil.rmtree(scratch_root, ignore_errors=True)
    notes = [f"{label}: {n}" for label in PARTS for n in part_notes.get(label, [])]
    notes.append(
        "targets: ours ≤ 2× floor and ≥ 10× sort-per-candidate at 87M; TIES ≤ 3.4× "
        "floor time and ≤ 1.5× floor RSS on the peer workload, the other peer methods "
        "within ~3× TIES's peak RSS (one tensor at a time; no time target: the SVD "
        "methods and WUDI's Adam steps do far more arithmetic); 7B merge/compress ≤ 4 "
        "GB RSS"
    )
    report(
        name,
        sections,
        notes=notes,
        started=started,
        meta={"part_notes": part_notes},
        out_dir=out_dir,
    )


if __name__ == "__main__":
    main()
