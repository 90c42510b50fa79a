"""The CPUs a job may really use, and torch's CPU threads held to them.

torch sizes its intra-op pool from the cores it sees, but a container's CPU quota (cgroup ``cpu.max``) is not among
them: a job on a 16-CPU share of a larger host would start one thread per host core and be throttled whenever it
computes on the CPU (upcycling, calibration, step-0 scoring), worse still beside another job. The record keeps what
the job saw (``results.json`` ``host``), so a slow CPU stage can be told from an oversubscribed one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("upcycle")

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP) -> int:
    """The CPUs this process may run on (its affinity), held to the cgroup's quota, at least 1."""
    try:
        seen = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        seen = os.cpu_count() or 1
    quota = _quota(root)
    return max(1, min(seen, math.floor(quota) if quota is not None else seen))


def hold_threads(root: Path = CGROUP) -> dict:
    """Lower torch's intra-op threads to the usable CPUs where it asked for more (OMP_NUM_THREADS, set by the user
    or a launcher, is kept); returns what the job saw, for its record."""
    usable, before = usable_cpus(root), torch.get_num_threads()
    if before > usable and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable)
        log.info("torch CPU threads %d -> %d: the CPUs this job may use (affinity and cgroup quota)", before, usable)
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable, "torch_threads": torch.get_num_threads()}
