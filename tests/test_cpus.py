"""harness/cpus.py: a container's CPU quota (cgroup v2 ``cpu.max`` or v1 CFS files) bounds the CPUs a job uses, and
torch's thread pool is lowered to it unless OMP_NUM_THREADS says otherwise."""

import os

import pytest
import torch

from harness.cpus import hold_threads, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _v1(tmp_path, quota, period):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    "make, want",
    [
        (lambda p: _v2(p, "150000 100000\n"), 1),  # 1.5 CPUs of quota: one whole CPU's thread
        (lambda p: _v2(p, "max 100000\n"), AFFINITY),  # no quota: the affinity mask
        (lambda p: _v1(p, 50000, 100000), 1),  # half a CPU still gets one thread
        (lambda p: _v1(p, -1, 100000), AFFINITY),  # v1's "no limit"
        (lambda p: _v2(p, f"{(AFFINITY + 8) * 100000} 100000\n"), AFFINITY),  # a quota wider than the mask
        (lambda p: p, AFFINITY),  # no cgroup files at all
    ],
)
def test_the_quota_bounds_the_usable_cpus(tmp_path, make, want):
    assert usable_cpus(make(tmp_path)) == want


def test_torch_threads_are_held_to_the_quota_unless_omp_says(tmp_path, monkeypatch):
    root = _v2(tmp_path, "100000 100000\n")  # one CPU
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        seen = hold_threads(root)
        assert torch.get_num_threads() == 1
        assert seen == {"cpu_count": os.cpu_count(), "usable_cpus": 1, "torch_threads": 1}
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's or a launcher's choice is kept
        assert hold_threads(root)["torch_threads"] == 2 and torch.get_num_threads() == 2
        assert hold_threads(tmp_path / "none")["torch_threads"] == 2  # no quota: nothing to lower
    finally:
        torch.set_num_threads(before)
