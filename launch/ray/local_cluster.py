"""A Ray cluster of several nodes on this one machine, over loopback: multi-node behaviour (where tasks run, how a
build scales with nodes, jobs submitted to a dashboard) tried without more machines.

Each node is a `ray start --block` process with its own ports and one temp dir for the cluster, so that no other
Ray instance on the machine sees it, and stopping it touches nothing else (`ray stop` would stop every Ray
instance of the user). Its processes all name the temp dir on their command line, which is how the stop makes
sure none is left, and reports any it had to end.

Nodes use Ray's token authentication, unless `RAY_AUTH_MODE` is set otherwise in their environment: the token of
that environment's `RAY_AUTH_TOKEN`, else the user's (`~/.ray/auth_token`, made as a local `ray.init` makes it
when there is none). Ray turns token authentication on by itself only for a cluster it finds, not for one it is
given the address of: a driver joining with `ray.init(address=...)` or `beit3 data build --ray-address` needs
`RAY_AUTH_MODE=token` in its environment before it imports ray, as the cluster's `environment` has it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = Path(sys.executable).parent / "ray"
START_SECONDS = 120.0
STOP_SECONDS = 60.0


@dataclass
class LoopbackCluster:
    address: str
    """The head's address, for `ray.init(address=...)` or `beit3 data build --ray-address`."""
    environment: dict[str, str]
    """The nodes' environment, which is also what a client of the cluster needs (its authentication settings)."""
    dashboard: str | None = None
    """The dashboard's URL (for job submission), when the head runs one."""
    leftovers: list[int] = field(default_factory=list)
    """Once stopped: the ids of the cluster's processes that outlived their nodes' stop and had to be killed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(base: Mapping[str, str]) -> dict[str, str]:
    """For the nodes and the `ray` commands that reach them: token authentication unless the caller chose a mode,
    and no address of another cluster."""
    environment = {key: value for key, value in base.items() if key != "RAY_ADDRESS"}
    environment["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a stopped node does not wait for its workers
    environment.setdefault("RAY_AUTH_MODE", "token")
    return environment


def _auth_token(environment: dict[str, str]) -> str | None:
    """The token the nodes will use (the user's is made if there is none), or None without token authentication."""
    if environment["RAY_AUTH_MODE"] != "token":
        return None
    return subprocess.run([str(RAY), "get-auth-token", "--generate"], env=environment, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def _start_node(arguments: list[str], cpus: int, temp_dir: str, environment: dict[str, str],
                log: Path) -> subprocess.Popen:
    """A node with `cpus` CPUs; ports Ray would otherwise take at fixed numbers get free ones, so nodes of this
    cluster and of other Ray instances on the machine do not collide."""
    command = [str(RAY), "start", "--block", "--num-cpus", str(cpus), "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
               "--dashboard-agent-listen-port", str(free_port()), *arguments]
    with open(log, "w") as output:
        return subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


STARTED = "Ray runtime started."
"""What `ray start` prints once its node is registered with the cluster (it waits for that before printing)."""


def _wait_until(ready: Callable[[], bool], what: str, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not ready():
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached within {START_SECONDS:.0f}s; see the logs in {logs[0].parent}")
        try:
            processes[-1].wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass


def _answers(url: str, token: str | None) -> bool:
    """Whether the dashboard serves `url`; a refusal of the request (such as of its token) is an error."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError:
        raise
    except OSError:  # not listening yet
        return False


def _processes_under(temp_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _stop(processes: list[subprocess.Popen], temp_dir: str) -> list[int]:
    """SIGTERM to each `ray start --block` (workers first), which stops the processes of its node; then any
    process still naming the temp dir is ended. Returns the ids of those that had to be."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + STOP_SECONDS / 2
    while leftovers := _processes_under(temp_dir):
        if time.monotonic() > deadline:
            for process in leftovers:
                process.kill()
            psutil.wait_procs(leftovers, timeout=5)
            return [process.pid for process in leftovers]
        psutil.wait_procs(leftovers, timeout=1)
    return []


@contextmanager
def loopback_cluster(nodes: int, logs: Path, cpus_per_node: int = 1, dashboard: bool = False,
                     environment: Mapping[str, str] | None = None) -> Iterator[LoopbackCluster]:
    """Start a head and `nodes - 1` worker nodes of `cpus_per_node` CPUs each on 127.0.0.1, with `environment`
    (this process's by default); yields the cluster once all are alive, and, with `dashboard`, once the head's
    dashboard (on a free port) answers. Stops them all on leaving, after which the cluster's `leftovers` are set.
    Each node's `ray start` output goes to `logs`/ray-node-N.log."""
    node_environment = _environment(os.environ if environment is None else environment)
    token = _auth_token(node_environment)
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    head = ["--head", "--port", str(port), "--ray-client-server-port", str(free_port())]
    cluster = LoopbackCluster(address=f"127.0.0.1:{port}", environment=node_environment)
    if dashboard:
        dashboard_port = free_port()
        head += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dashboard_port)]
        cluster.dashboard = f"http://127.0.0.1:{dashboard_port}"
    else:
        head += ["--include-dashboard", "false"]
    processes: list[subprocess.Popen] = []
    node_logs = [logs / f"ray-node-{index}.log" for index in range(nodes)]
    try:
        for index, log in enumerate(node_logs):
            processes.append(_start_node(head if index == 0 else ["--address", cluster.address], cpus_per_node,
                                         temp_dir, node_environment, log))
        _wait_until(lambda: all(STARTED in log.read_text(errors="replace") for log in node_logs),
                    f"all {nodes} Ray nodes registered", processes, node_logs)
        if dashboard:
            _wait_until(lambda: _answers(f"{cluster.dashboard}/api/version", token), "the dashboard answering",
                        processes, node_logs)
        yield cluster
    finally:
        cluster.leftovers = _stop(processes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
