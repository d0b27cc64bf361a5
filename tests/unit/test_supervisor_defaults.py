"""How many worker processes ``pgflow worker`` starts by default (no database needed)."""

from __future__ import annotations

import os

import pytest

from pgflow.supervisor import default_processes

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000", CORES),  # no quota: every core it may run on
    ("100000 100000", 1),
    ("150000 100000", min(CORES, 2)),  # 1.5 CPUs: rounded up
    ("50000 100000", 1),  # half a CPU: still one process
    ("6400000 100000", CORES),  # a quota above the cores does not add processes
    ("garbage", CORES),
])
def test_a_cpu_quota_caps_the_default(tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    assert default_processes(str(path)) == expected


def test_without_a_cgroup_file_it_is_the_cores(tmp_path):
    assert default_processes(str(tmp_path / "missing")) == CORES
