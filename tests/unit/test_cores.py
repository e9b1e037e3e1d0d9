"""The usable cores: affinity capped by a cgroup quota, read from files laid out as
the kernel lays them out (cgroup v2 and v1), in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

from imgsvc import cores


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_of_the_root_as_a_container_sees_it(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cores.cpu_quota(tmp_path) == 1.5


def test_v2_without_a_limit_has_no_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cores.cpu_quota(tmp_path) is None
    assert cores.cpu_quota(tmp_path / "absent") is None


def test_v2_the_smallest_quota_of_the_cgroup_and_those_above_it(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "machine.slice" / "cpu.max", "300000 100000\n")
    write(tmp_path / "machine.slice" / "app.scope" / "cpu.max", "max 100000\n")
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/machine.slice/app.scope\n")
    assert cores.own_cgroups(proc) == {"": "/machine.slice/app.scope"}
    assert cores.cpu_quota(tmp_path, cores.own_cgroups(proc)) == 3.0


def test_a_host_path_the_container_does_not_see_reads_the_mount(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "200000 100000\n")
    assert cores.cpu_quota(tmp_path, {"": "/docker/0123abcd"}) == 2.0


def test_v1_quota_over_period_and_minus_one_for_none(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cores.cpu_quota(tmp_path) == 2.5
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cores.cpu_quota(tmp_path) is None


def test_v1_own_cgroup_from_the_cpu_controller_line(tmp_path: Path) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu" / "batch" / "cpu.cfs_quota_us", "100000\n")
    write(tmp_path / "cpu" / "batch" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "proc-cgroup"
    write(proc, "4:memory:/other\n2:cpuacct,cpu:/batch\n1:name=systemd:/\n")
    assert cores.own_cgroups(proc)["cpu"] == "/batch"
    assert cores.cpu_quota(tmp_path, cores.own_cgroups(proc)) == 1.0


def test_malformed_files_are_no_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "lots\n")
    assert cores.cpu_quota(tmp_path) is None
    write(tmp_path / "cpu.max", "0 100000\n")
    assert cores.cpu_quota(tmp_path) is None


def test_usable_cores_is_the_affinity_capped_by_the_quota_rounded_down(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/\n")
    assert cores.usable_cores(tmp_path, proc) == affinity  # no cpu.max: no quota
    write(tmp_path / "cpu.max", "50000 100000\n")  # half a core: still one
    assert cores.usable_cores(tmp_path, proc) == 1
    write(tmp_path / "cpu.max", f"{(affinity + 5) * 100000} 100000\n")  # above the affinity
    assert cores.usable_cores(tmp_path, proc) == affinity
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cores.usable_cores(tmp_path, proc) == 1
