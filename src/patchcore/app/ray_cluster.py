"""Connecting to Ray for the cluster jobs (ray_predict, ray_fit): one place that decides local vs remote.

Ray is an optional extra (`pip install 'patchcore[ray]'`); only the `app/ray_*` modules import it, and the
command line imports those only when `--ray` is given (tests/test_architecture.py enforces both).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import ray
import ray.data

LOCAL = "local"  # `--ray` without an address: a Ray instance on this machine, started and stopped by the job


class RaySession:
    """`with RaySession(address):` -> connected to ADDRESS (or a fresh local instance), and disconnected
    after. An already initialised Ray (a test's, an application's) is used as it is and left running."""

    def __init__(self, address: str | None = LOCAL, *, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus
        self._started = False

    def __enter__(self) -> RaySession:
        if ray.is_initialized():
            return self
        quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        # The workers inherit the driver's environment: passive OpenMP waiting, so idle torch threads do
        # not spin on shared cores (13x slower fits were measured under load, README).
        env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
        if self.address in (None, LOCAL):
            # Workers at the driver's priority: Ray's default (nice 15) lets any other job on a shared machine
            # take their CPU; the single-process commands run at the normal priority too.
            # address="local": always a new instance, never one that another job on this machine started.
            ray.init(address="local", num_cpus=self.num_cpus, runtime_env=env, _system_config={"worker_niceness": 0},
                     **quiet)
        else:
            ray.init(address=self.address, runtime_env=env, log_to_driver=False, configure_logging=False)
        self._started = True
        context = ray.data.DataContext.get_current()  # a command line's stderr: no per-stage progress tables
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            ray.shutdown()

    @staticmethod
    def cluster_cpus() -> int:
        return int(ray.cluster_resources().get("CPU", 1))

    @staticmethod
    def largest_node_cpus() -> int:
        return max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])


def file_sha256(path: str | Path) -> str:
    """The model's version as written in every result row: the hash of the model file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
