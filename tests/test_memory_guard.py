"""Available memory (host, cgroup, CUDA) and the refusal of a plan that does not fit it."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from autoseg.cli import main
from autoseg.errors import PlanError
from autoseg.planning.plans import load_plans
from autoseg.training import memory_guard
from tests.conftest import TRAIN_TINY, shrink_plan_to_tiny_unet

GB = 2**30


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_available_is_limit_minus_working_set(tmp_path):
    write(tmp_path / "memory.max", str(4 * GB))
    write(tmp_path / "memory.current", str(3 * GB))
    write(tmp_path / "memory.stat", f"anon 123\ninactive_file {GB}\nactive_file 5\n")
    # 4 GB limit, 3 GB charged of which 1 GB reclaimable page cache: 2 GB left
    assert memory_guard.cgroup_available_bytes(tmp_path) == 2 * GB


def test_cgroup_v1_and_unlimited(tmp_path):
    write(tmp_path / "memory" / "memory.limit_in_bytes", str(6 * GB))
    write(tmp_path / "memory" / "memory.usage_in_bytes", str(5 * GB))
    write(tmp_path / "memory" / "memory.stat", f"cache 1\ntotal_inactive_file {2 * GB}\n")
    assert memory_guard.cgroup_available_bytes(tmp_path) == 3 * GB
    write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    assert memory_guard.cgroup_available_bytes(tmp_path) is None
    write(tmp_path / "v2" / "memory.max", "max")
    write(tmp_path / "v2" / "memory.current", "100")
    assert memory_guard.cgroup_available_bytes(tmp_path / "v2") is None


def test_host_available_takes_the_smaller_of_meminfo_and_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    write(meminfo, "MemTotal:       24683664 kB\nMemFree:  100 kB\nMemAvailable:   10485760 kB\n")
    assert memory_guard.host_available_bytes(meminfo, tmp_path / "no-cgroup") == 10 * GB
    write(tmp_path / "cg" / "memory.max", str(4 * GB))
    write(tmp_path / "cg" / "memory.current", str(GB))
    assert memory_guard.host_available_bytes(meminfo, tmp_path / "cg") == 3 * GB


def test_cuda_available_counts_the_context_and_this_process_memory_once(monkeypatch):
    # Read after the network is on the device: free memory already lacks the context and the weights
    # (1 GB reserved by this process), which the step's estimate counts too.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GB, 141 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GB)
    assert memory_guard.available_bytes(torch.device("cuda", 0)) == 6 * GB + GB // 2


@pytest.fixture(scope="module")
def tiny_plans(tmp_path_factory, synthetic_raw):
    """The synthetic dataset planned and preprocessed, its U-Net shrunk: (plans.json, root flags, results root)."""
    tmp_path = tmp_path_factory.mktemp("guard")
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    shutil.copytree(synthetic_raw, raw / synthetic_raw.name)
    flags = [f"--raw={raw}", f"--preprocessed={pre}", f"--results={res}"]
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-a", "unet", "-np", "1", *flags]) == 0
    plans_file = pre / synthetic_raw.name / "plans.json"
    shrink_plan_to_tiny_unet(plans_file)
    return plans_file, flags, res


def test_cuda_plan_above_free_memory_is_refused(monkeypatch, tiny_plans):
    plans_file, _, _ = tiny_plans
    plans = load_plans(plans_file)
    plan = plans.architecture("3d_fullres", "unet")
    # The tiny U-Net's CUDA estimate is the 0.5 GB context and a few MB: none free (0.5 GB with the
    # context given back) is too little, 2 GB enough.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 141 * GB))
    with pytest.raises(PlanError, match=r"unet .*needs about 0\.\d GB .* on the cuda \(bfloat16\) but 0\.5 GB"):
        memory_guard.check_training_memory(plans, plans_file, "3d_fullres", plan, 2, torch.device("cuda"),
                                           torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GB, 141 * GB))
    memory_guard.check_training_memory(plans, plans_file, "3d_fullres", plan, 2, torch.device("cuda"), torch.bfloat16)
    # Under DDP each rank also holds gradient buckets, 4 bytes a parameter: 2.2 GiB more for 600 M of them,
    # past the 2.5 GiB available (2 free, the context given back).
    plan.num_parameters = 600_000_000
    memory_guard.check_training_memory(plans, plans_file, "3d_fullres", plan, 2, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(PlanError, match=r"needs about 2\.\d GB"):
        memory_guard.check_training_memory(plans, plans_file, "3d_fullres", plan, 2, torch.device("cuda"),
                                           torch.bfloat16, ranks=2)


def test_train_refuses_a_plan_above_host_memory_in_one_line(monkeypatch, tiny_plans, capsys):
    plans_file, flags, res = tiny_plans
    capsys.readouterr()
    # The tiny U-Net's fp32 CPU step needs a few MB of weights, gradients and momentum alone.
    monkeypatch.setattr(memory_guard, "host_available_bytes", lambda *a: 2**20)
    assert main([*TRAIN_TINY, "--device", "cpu", "--fp32", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(plans_file) in err and "unet" in err and "(fp32) but 0.0 GB are available" in err
    # the flag that plans for a smaller budget, with a budget below the 8 GB the plan was made for
    budget = re.search(r"autoseg plan-and-preprocess -d Dataset999_Synthetic --gpu-memory-gb ([\d.]+)$", err)
    assert budget and float(budget.group(1)) < load_plans(plans_file).gpu_memory_gb
    assert not res.exists() or not any(res.rglob("*"))  # nothing written
