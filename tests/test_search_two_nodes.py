"""A search on a two-node Ray cluster on this machine (slow: a minute or two each).

A head and one worker node are started with ``ray start`` (``--address`` for the
worker), each with one CPU and a resource of its own, every port free and chosen here.
A streamed search (candidates read from the checkpoints by path on every node) runs
through ``RAY_ADDRESS`` with two trials in flight, and the trials' ledger records the
node each ran on. In the second test the worker node runs in a mount namespace of its
own where the checkpoints' directory is an empty tmpfs: a node of a cluster that
cannot see the shared storage. Its trials fail with one line naming the node and the
path, and the search goes on on the head.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from tests.test_search_cluster import free_ports, stop_nodes  # noqa: E402
from tests.test_search_support import write_tiny_search  # noqa: E402

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        # the nodes' workers import this checkout's npstune, as the driver does
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    nm, om, metrics, agent, agent_grpc, rt_env = free_ports(6)
    return [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}",
    ]


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    try:
        return int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


@contextlib.contextmanager
def two_nodes(hide: Path | None = None) -> Iterator[str]:
    """A head and a worker node; yields the GCS address. ``hide``: a directory the
    worker node sees as empty (its own mount namespace)."""
    env = _env()
    (gcs, client) = free_ports(2)
    temp = tempfile.mkdtemp(prefix="/tmp/r2")  # Ray's socket paths are length-limited
    head_cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=1",
        "--num-gpus=0",
        '--resources={"head_node": 1}',
        "--include-dashboard=false",
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp}",
        *_node_ports(),
    ]
    worker_cmd = [
        str(BIN / "ray"),
        "start",
        f"--address=127.0.0.1:{gcs}",
        "--block",
        "--num-cpus=1",
        "--num-gpus=0",
        '--resources={"worker_node": 1}',
        *_node_ports(),
    ]
    if hide is not None:
        inner = " ".join(f"'{a}'" for a in worker_cmd)
        worker_cmd = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs none '{hide}' && exec {inner}",
        ]
    procs = []
    address = f"127.0.0.1:{gcs}"
    try:
        for cmd in (head_cmd, worker_cmd):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            if cmd is head_cmd:
                time.sleep(5)
        deadline = time.time() + 180
        while _alive_nodes(address, env) < 2:
            assert all(p.poll() is None for p in procs), "a Ray node exited"
            assert time.time() < deadline, "the two Ray nodes did not come up"
            time.sleep(2)
        yield address
    finally:
        stop_nodes(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _search(tmp: Path, ckpt: Path | None = None) -> Path:
    path = write_tiny_search(
        tmp,
        name="two-nodes",
        nps={"candidates": "stream"},
        search={"generations": 2, "population": 4},
        resources={"cpus_per_trial": 1, "concurrency": 2},
        report={"baselines": [], "save_model": False},
        tracking={"enabled": False},
    )
    if ckpt is not None:  # the search's checkpoints in a directory of their own
        cfg = yaml.safe_load(path.read_text())
        ckpt.mkdir()
        for key in ("base",):
            cfg[key] = str(shutil.copy(cfg[key], ckpt))
        cfg["models"] = [str(shutil.copy(m, ckpt)) for m in cfg["models"]]
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(path: Path, address: str) -> tuple[subprocess.CompletedProcess, list]:
    res = subprocess.run(
        [str(BIN / "npstune"), "search", str(path)],
        env={**_env(), "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = Path(yaml.safe_load(path.read_text())["output_dir"])
    found = out / "state" / "ledger.json"
    assert found.is_file(), res.stdout + res.stderr
    ledger = json.loads(found.read_text())
    return res, ledger["records"]


@pytest.mark.slow
def test_a_search_runs_trials_on_both_nodes(tmp_path):
    path = _search(tmp_path / "job")
    with two_nodes() as address:
        res, recs = _run(path, address)
    said = res.stdout + res.stderr
    assert res.returncode == 0, said
    assert "Ray: connected to the cluster" in said
    assert "streamed from the checkpoints, as asked" in said
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs), recs
    nodes = {r["node"] for r in recs}
    assert len(nodes) == 2 and "" not in nodes, nodes


def _can_hide() -> bool:
    try:
        d = tempfile.mkdtemp()
        ok = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {d}"],
            capture_output=True,
        )
        os.rmdir(d)
        return ok.returncode == 0
    except OSError:
        return False


@pytest.mark.slow
def test_a_node_that_cannot_see_the_checkpoints_fails_its_trials_only(tmp_path):
    if not _can_hide():
        pytest.skip("needs `unshare -m` and tmpfs mounts to hide a path from a node")
    ckpt = tmp_path / "shared"
    path = _search(tmp_path / "job", ckpt)
    with two_nodes(hide=ckpt) as address:
        res, recs = _run(path, address)
    said = res.stdout + res.stderr
    assert res.returncode == 0, said
    failed = [r for r in recs if r["status"] == "error"]
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(recs) == 8 and failed and ok, recs
    # the failures are the worker node's, the successes the head's
    assert not {r["node"] for r in failed} & {r["node"] for r in ok}
    for r in failed:
        assert re.match(r"node [\w.:]+: ", r["error"]), r["error"]
        assert str(ckpt) in r["error"] and "no such file" in r["error"]
        assert "same path" in r["error"] and "\n" not in r["error"]
    lines = [ln for ln in said.splitlines() if " failed: node " in ln]
    assert len(lines) == len(failed), said
