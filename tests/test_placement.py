"""Where a trial runs under Ray, and what it may ask Ray for.

A local Ray with two GPUs declared on this CPU machine (Ray schedules and numbers GPUs without
touching them): the device a trial resolves to comes from the accelerator ids Ray assigned it,
not from what torch can see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray

from analysis.errors import SpecError
from study.spec import _check_study_keys, check_placement, parse_study
from trainables.tune_adapter import ray_device


@pytest.fixture(scope="module")
def ray_with_two_gpus() -> Iterator[None]:
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@ray.remote
def _resolved(requested: str) -> tuple[str, list[str], str | None]:
    return str(ray_device(requested)), ray.get_runtime_context().get_accelerator_ids()["GPU"], os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_trial_without_a_gpu_runs_on_the_cpu_on_a_gpu_node(ray_with_two_gpus: None) -> None:
    # resources.gpu 0: Ray assigns no GPU, so `auto` is the CPU even though the node has GPUs
    device, ids, _visible = ray.get(_resolved.options(num_cpus=1, num_gpus=0).remote("auto"))
    assert (device, ids) == ("cpu", [])


def test_a_trial_with_a_gpu_runs_on_the_one_ray_assigned(ray_with_two_gpus: None) -> None:
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU, which torch then numbers 0
    runs = ray.get([_resolved.options(num_cpus=0.5, num_gpus=1).remote("auto") for _ in range(2)])
    assert {device for device, _ids, _v in runs} == {"cuda:0"}
    assert sorted(ids[0] for _d, ids, _v in runs) == ["0", "1"]  # the two trials got different GPUs
    assert all(visible == ids[0] for _d, ids, visible in runs)


def test_fractional_trials_share_a_gpu_and_cpu_stays_cpu(ray_with_two_gpus: None) -> None:
    shared = ray.get([_resolved.options(num_cpus=0.25, num_gpus=0.5).remote("auto") for _ in range(2)])
    assert all(device == "cuda:0" and len(ids) == 1 for device, ids, _v in shared)
    device, ids, _v = ray.get(_resolved.options(num_cpus=0.5, num_gpus=1).remote("cpu"))
    assert device == "cpu" and ids  # `device: cpu` is honoured even with a GPU reserved


@pytest.mark.parametrize(("resources", "device", "named", "says"), [
    ({"gpus": 1}, "auto", "resources.gpus", "unknown key"),
    ({"gpu": 2}, "auto", "resources.gpu", "one GPU at most"),
    ({"gpu": 0.3}, "auto", "resources.gpu", "use 1/k"),
    ({"gpu": -0.5}, "auto", "resources.gpu", "[0, 1]"),
    ({"cpu": 0}, "auto", "resources.cpu", "positive"),
    ({"cpu": "two"}, "auto", "resources.cpu", "expected a number"),
    ({"gpu": 0}, "cuda", "resources.gpu", "`device: cuda`"),
    (None, "cuda", "resources.gpu", "`device: cuda`"),
])
def test_resources_are_validated_like_every_other_key(resources: dict | None, device: str, named: str, says: str) -> None:
    raw = {"device": device} | ({} if resources is None else {"resources": resources})
    with pytest.raises(SpecError, match=says.replace("[", r"\[").replace("]", r"\]")) as err:
        study = parse_study(raw)
        check_placement(study.trial, study.keys)
    assert err.value.key == named


def test_a_trial_spec_for_energyat_train_may_say_cuda_without_resources() -> None:
    # `energyat train` places nothing: only a study needs a GPU reserved for `device: cuda`
    assert _check_study_keys({"device": "cuda"}).resources == {"cpu": 1, "gpu": 0}


@pytest.mark.parametrize("gpu", [0, 0.25, 0.2, 0.5, 1])
def test_gpu_shares_that_divide_a_gpu_are_accepted(gpu: float) -> None:
    assert _check_study_keys({"resources": {"cpu": 2, "gpu": gpu}, "device": "auto"}).resources == {"cpu": 2.0, "gpu": float(gpu)}
