"""A real two-process Ray cluster on this machine, for the job-submission tests.

`LocalRayCluster(temp_dir, logs=..., env=...)` runs `ray start --head --block` (GCS, raylet,
dashboard and its Jobs API on 127.0.0.1) and a second `ray start --address ... --block` node,
each with one CPU, in their own process groups. `stop()` terminates every process they started
(collected from the process tree and by the cluster's temp folder or GCS address in their
command lines), waits, kills whatever is left, and returns the PIDs still alive (none, when it
worked).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from mlflow_servers import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _node_ports() -> list[str]:
    """Own ports for a node's agents: two nodes on one host would otherwise both try Ray's
    defaults (the dashboard agent's 52365), and the loser's jobs find no agent."""
    options = (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    )
    return [word for option in options for word in (option, str(free_port()))]


class LocalRayCluster:
    def __init__(self, temp_dir: Path, *, logs: Path, env: dict[str, str]) -> None:
        self.temp_dir = Path(temp_dir)
        self.logs = Path(logs)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # A driver-side RAY_ADDRESS (the test session's own cluster) must not leak in.
        self.env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        self.nodes: list[subprocess.Popen] = []
        self._seen: dict[int, psutil.Process] = {}

    def start(self, *, timeout_s: float = 120.0) -> LocalRayCluster:
        head = [
            RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
            "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
        ]  # fmt: skip
        self.nodes.append(self._spawn([*head, *_node_ports()], "head"))
        self._wait_for_nodes(1, timeout_s)
        worker = [
            RAY, "start", "--block", "--address", f"127.0.0.1:{self.gcs_port}",
            "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
            "--disable-usage-stats",
        ]  # fmt: skip
        self.nodes.append(self._spawn([*worker, *_node_ports()], "worker"))
        self._wait_for_nodes(2, timeout_s)
        return self

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        with open(self.logs / f"ray-{name}.log", "w") as log:
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"ray start exited with {node.returncode}: {node.args}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=5) as r:
                    summary = json.load(r)["data"]["summary"]
                alive = [node for node in summary if node["raylet"]["state"] == "ALIVE"]
                if len(alive) >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            self._remember_processes()
            time.sleep(1.0)
        raise RuntimeError(f"the cluster did not reach {count} nodes in {timeout_s} s")

    def alive_nodes(self) -> int:
        with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=5) as r:
            summary = json.load(r)["data"]["summary"]
        return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")

    def _remember_processes(self) -> None:
        """Every process of this cluster: the nodes' trees, plus anything whose command line
        names the cluster's temp folder or GCS port (job drivers start their own sessions)."""
        marker_dir, marker_port = str(self.temp_dir), f"127.0.0.1:{self.gcs_port}"
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                for process in [root, *root.children(recursive=True)]:
                    self._seen[process.pid] = process
            except psutil.NoSuchProcess:
                continue
        for process in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(process.info["cmdline"] or [])
            if marker_dir in line or marker_port in line:
                self._seen[process.pid] = process

    def stop(self, *, grace_s: float = 20.0) -> list[int]:
        """Stop everything this cluster started; returns the PIDs that survived."""
        self._remember_processes()
        for node in self.nodes:
            with _ignored():
                os.killpg(node.pid, signal.SIGTERM)
        for process in self._seen.values():
            with _ignored():
                process.terminate()
        _, alive = psutil.wait_procs(list(self._seen.values()), timeout=grace_s)
        for process in alive:
            with _ignored():
                process.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        for node in self.nodes:
            with _ignored():
                node.wait(timeout=10)
        return [process.pid for process in alive]


class _ignored:
    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        return kind is not None and issubclass(
            kind, ProcessLookupError | psutil.NoSuchProcess | PermissionError
        )
