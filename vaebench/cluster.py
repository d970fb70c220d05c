"""Ray, when vaebench runs on a cluster (`--executor ray`): connecting to it, what each task asks
for, and waiting on tasks while their results stream back. Ray is imported here only, and only
when asked for (`pip install 'vaebench[cluster]'`); nothing else in vaebench knows it exists.

What runs on the cluster is vaebench's own work as Ray tasks: a unit of cells
(vaebench.executors.RayExecutor) or an Optuna worker of a study (vaebench.tune.workers). Ray
schedules them on the nodes with their declared resources (`num_gpus` may be fractional, so that
small units share a GPU), retries a task whose worker died on another node, and reuses its worker
processes, so a dataset loaded by one task stays loaded for the next. The shared state lives
outside Ray: the MLflow tracking server (and its artifact store), the Optuna RDB storage, and the
data directory (README, "Running on a cluster").
"""

from __future__ import annotations

import os
from typing import Any, Iterator

TASK_RETRIES = 3  # a task whose worker process or node died is run again (elsewhere), this often
PROBE_SECONDS = 5.0  # how long a cluster's address has to accept a TCP connection before Ray is asked


class ClusterError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def connect(address: str | None) -> Any:
    """The `ray` module, connected: to the cluster at `address` (`auto`: the one `ray start` runs
    on this machine; HOST:PORT; `ray://...`), or, with None, to RAY_ADDRESS or a new local one."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--executor ray needs Ray: pip install 'vaebench[cluster]' (the same version on "
                           "every node)") from None
    if not ray.is_initialized():
        problem = unreachable(address if address is not None else os.environ.get("RAY_ADDRESS"))
        if problem:  # Ray itself waits on an address where nothing answers for minutes, or for ever
            raise ClusterError(f"{problem}; start it with `ray start --head` (then --ray-address auto) or "
                               f"leave --ray-address out")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a new local cluster"
            raise ClusterError(f"could not connect to the Ray cluster at {where}: {e}; start it with "
                               f"`ray start --head` (then --ray-address auto) or leave --ray-address out") from None
    return ray


def unreachable(address: str | None, seconds: float = PROBE_SECONDS) -> str | None:
    """Why nothing can be reached at a HOST:PORT (or ray://HOST:PORT) cluster address, or None:
    one TCP connection tried. `auto`, None and addresses without a port are left to Ray."""
    import socket

    if not address or address == "auto":
        return None
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            return None
    except OSError as e:
        return f"could not connect to the Ray cluster at {address}: nothing answers there ({e.strerror or e})"


def gpus(ray: Any) -> float:
    """GPUs in the whole cluster (0 on a CPU-only one)."""
    return float(ray.cluster_resources().get("GPU", 0))


def results(ray: Any, refs: list[Any], timeout: float | None = None) -> Iterator[Any]:
    """The results of `refs` in the order the tasks finish (a task's exception is raised here)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        for ref in done:
            yield ray.get(ref)


def cancel(ray: Any, refs: list[Any]) -> None:
    """Ctrl-C: a KeyboardInterrupt inside every task still running (their runs end KILLED, as
    locally), and the ones not started yet never start."""
    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - already finished
            pass
