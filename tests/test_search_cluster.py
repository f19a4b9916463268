"""`ray job submit` on a real local cluster (slow: about a minute).

Starts a head node (`ray start --head --block` in its own process group, every port free
and chosen here, dashboard on), submits a tiny search with `ray job submit
--working-dir` (the config, the evaluator module and the tiny checkpoints travel with
it), waits for it, checks the MLflow runs it produced, and stops exactly the cluster it
started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from tests.test_search_support import mlflow_runs, write_tiny_search  # noqa: E402

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    """Stop ``ray start --block`` processes (each stops what it started on SIGTERM),
    the last started first; SIGKILL after a minute."""
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_ray_job_submit_runs_a_search(tmp_path):
    job_dir = tmp_path / "job"
    cfg_path = write_tiny_search(job_dir, name="cluster", search={"generations": 2})
    cfg = yaml.safe_load(cfg_path.read_text())
    # paths relative to the working dir: the job runs inside its uploaded copy
    cfg["base"] = "base.safetensors"
    cfg["models"] = [f"task{t}.safetensors" for t in range(3)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg["tracking"]["uri"] = uri
    cfg["output_dir"] = str(tmp_path / "out")
    cfg_path.write_text(yaml.safe_dump(cfg))

    gcs, dash, agent, agent_grpc, metrics, client, rt_env, nm, om = free_ports(9)
    temp = tempfile.mkdtemp(
        prefix="/tmp/rt"
    )  # short: Ray's socket paths are length-limited
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--runtime-env-agent-port={rt_env}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, head.stdout.read().decode()
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "the dashboard did not come up"
                time.sleep(1)
        res = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(job_dir),
                "--",
                "npstune",
                "search",
                "search.yaml",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "succeeded" in out, out
        assert "Ray: connected to the cluster" in out, (
            out
        )  # not a private local instance
        assert "generation 2/2" in out and "NPS (searched)" in out
    finally:
        stop_nodes([head])
        shutil.rmtree(temp, ignore_errors=True)

    parents, children = mlflow_runs(uri, "cluster")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children[parents[0].info.run_id]) == 2 * 4
    assert (tmp_path / "out" / "results.md").is_file()
