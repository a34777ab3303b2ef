"""Joining (or starting) the Ray cluster the RL roles run on. Ray is an optional extra, imported here only."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from thinkforge.cluster.config import ClusterConfig
from thinkforge.errors import ThinkforgeError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ThinkforgeError("cluster.backend=ray needs ray installed (pip install 'thinkforge[cluster]')") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """The TCP endpoint of a Ray address ("host:port" or "ray://host:port"), None for "auto"."""
    addr = address.split("://", 1)[-1].rstrip("/")
    if addr == "auto":
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ThinkforgeError(f"cluster.address must look like host:port or ray://host:port, got {address!r}")
    return host or "127.0.0.1", int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fails in one line, before any compute, when nothing listens at a Ray address."""
    endpoint = _host_port(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as err:
        raise ThinkforgeError(f"cluster.address {address!r}: no Ray cluster answers at "
                              f"{endpoint[0]}:{endpoint[1]} ({err.strerror or err})") from None


def connect(cluster: ClusterConfig) -> Any:
    """Joins `cluster.address`, or starts a local cluster (no dashboard); returns the ray module."""
    ray = import_ray()
    if cluster.address:
        check_reachable(cluster.address, cluster.connect_timeout_s)
    if ray.is_initialized():
        return ray
    # Workers import thinkforge (and `worker_imports`) from the driver's paths: a checkout need not be installed.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    if cluster.address:
        try:
            ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
        except (ConnectionError, RuntimeError) as err:
            raise ThinkforgeError(f"cluster.address {cluster.address!r}: cannot join the Ray cluster "
                                  f"({str(err).splitlines()[0]})") from None
    else:
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    return ray


def task_error_cause(err: BaseException) -> BaseException:
    """The exception a Ray actor raised (RayTaskError wraps it)."""
    return getattr(err, "cause", None) or err
