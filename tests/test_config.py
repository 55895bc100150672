"""Engine defaults that depend on the machine: torch threads from OMP_NUM_THREADS, CPU
affinity and the cgroup CPU limit (files written here in both cgroup layouts)."""

from __future__ import annotations

import os

from argosy.runtime.config import cgroup_cpu_limit, default_num_threads


def test_cgroup_cpu_limit_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(v1)) == 1.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(v1)) is None
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None


def test_default_threads_follow_omp_then_the_cgroup_limit(tmp_path, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_num_threads(str(tmp_path / "absent")) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one thread
    assert default_num_threads(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text(f"{(cores + 8) * 100000} 100000\n")  # above the cores: the cores
    assert default_num_threads(str(tmp_path)) == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads(str(tmp_path)) == 3
