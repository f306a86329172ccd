"""The CPU thread policy (`vqar.utils.threads`): which count it picks, what it leaves alone, and the OpenMP wait
policy it sets before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vqar.utils import threads
from vqar.utils.threads import ThreadPlan, cgroup_cpu_limit, plan_threads, prepare_openmp


def test_default_takes_the_available_cores_up_to_torchs_choice():
    assert plan_threads({}, cores=2, torch_default=2, current=2).threads == 2
    # A cgroup quota or affinity mask smaller than the machine: fewer threads than torch's choice.
    assert plan_threads({}, cores=3, torch_default=8, current=8).threads == 3
    # Never more than torch picked (torch counts physical cores; hyper-threads would slow compute-bound work).
    assert plan_threads({}, cores=16, torch_default=8, current=8).threads == 8


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_an_explicit_thread_variable_is_respected(name):
    plan = plan_threads({name: "3"}, cores=2, torch_default=3, current=3)
    assert plan == ThreadPlan(None, f"{name}=3")


def test_an_explicit_torch_set_num_threads_is_kept():
    plan = plan_threads({}, cores=8, torch_default=8, current=1)
    assert plan.threads is None and "set_num_threads(1)" in plan.reason
    # torch imported before vqar: its default is unknown, so the current count may be the user's and is kept.
    assert plan_threads({}, cores=8, torch_default=None, current=8).threads is None


def test_torchrun_divides_the_cores_by_the_local_world_size():
    # torchrun's placeholder OMP_NUM_THREADS=1 (set for every multi-process launch) does not count as a choice.
    env = {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}
    assert plan_threads(env, cores=16, torch_default=1, current=1).threads == 4  # torch read the placeholder
    assert plan_threads({"LOCAL_WORLD_SIZE": "4"}, cores=16, torch_default=16, current=16).threads == 4
    assert plan_threads({"LOCAL_WORLD_SIZE": "3"}, cores=2, torch_default=2, current=2).threads == 1
    # Any other OMP_NUM_THREADS under torchrun is the user's, and one process needs no division.
    assert plan_threads({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "2"}, 16, 16, 2).threads is None
    assert plan_threads({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, 16, 16, 1).threads is None


def test_vqar_threads_overrides_and_torch_turns_the_policy_off():
    assert plan_threads({"VQAR_THREADS": "1", "OMP_NUM_THREADS": "4"}, 2, 2, 4).threads == 1
    assert plan_threads({"VQAR_THREADS": "torch"}, 2, 2, 2).threads is None
    assert plan_threads({"VQAR_THREADS": "auto", "LOCAL_WORLD_SIZE": "2"}, 8, 8, 8).threads == 4
    with pytest.raises(ValueError, match="VQAR_THREADS must be a positive thread count"):
        plan_threads({"VQAR_THREADS": "0"}, 2, 2, 2)


def test_wait_policy_is_set_only_before_torch_and_only_when_not_chosen():
    env: dict[str, str] = {}
    assert prepare_openmp(env, torch_loaded=False) == {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "0"}
    assert env["GOMP_SPINCOUNT"] == "2000"
    assert prepare_openmp({}, torch_loaded=True) == {}  # too late: OpenMP has read its settings
    chosen = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert prepare_openmp(chosen, torch_loaded=False) == {} and chosen == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert prepare_openmp({"VQAR_THREADS": "torch"}, torch_loaded=False) == {}


def test_cgroup_quota_in_whole_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None


PROBE = """
import json, os, sys
import vqar
import torch
from vqar.utils.threads import apply_thread_policy
plan = apply_thread_policy()
print(json.dumps({"threads": torch.get_num_threads(), "reason": plan.reason,
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT")}))
"""


def _probe(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VQAR_THREADS",
                                                                "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                                "LOCAL_WORLD_SIZE")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          check=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_gets_the_policy_before_torch_loads():
    """The CLI's situation: vqar is imported before torch, so the wait policy reaches OpenMP and the count is
    chosen; an OMP_NUM_THREADS given by the user stays."""
    fresh = _probe({})
    assert fresh["spin"] == "2000" and fresh["wait"] is None
    assert 1 <= fresh["threads"] <= threads.available_cores()
    assert fresh["reason"].endswith("available cores")
    given = _probe({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert given == {"threads": 1, "reason": "OMP_NUM_THREADS=1", "wait": "ACTIVE", "spin": None}
    assert _probe({"VQAR_THREADS": "1"})["threads"] == 1
