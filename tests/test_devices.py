"""Model placement: the pure device choice, Ray's assignment read in a real worker, and the hf backend using it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rr_ray.models import loader
from rr_ray.models.loader import choose_device, model_device, ray_assigned_gpus


@pytest.mark.parametrize(("assigned", "cuda", "visible", "expected"), [
    (None, False, None, "cpu"),              # plain script / driver on a CPU machine
    (None, True, None, "cuda"),              # outside Ray with a GPU: the process owns the machine
    ([], False, None, "cpu"),                # Ray worker, no GPU asked for, CPU node
    ([], True, None, "cpu"),                 # ... on a GPU node: a GPU Ray did not reserve stays untouched
    (["2"], True, None, "cuda:0"),           # Ray set CUDA_VISIBLE_DEVICES=2: that GPU is cuda:0
    (["2"], True, ["2"], "cuda:0"),
    (["2"], True, ["0", "1", "2", "3"], "cuda:2"),  # visible set wider than the assignment (NOSET, sharing)
    (["3", "1"], True, ["1", "3"], "cuda:0"),       # several assigned: the first visible one
    (["2"], False, ["2"], "cpu"),            # assigned, but this torch build has no CUDA
])
def test_choose_device(assigned: list[str] | None, cuda: bool, visible: list[str] | None, expected: str) -> None:
    assert choose_device(assigned, cuda, visible) == expected


def test_wrapper_maps_ray_assignment_through_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(loader, "ray_assigned_gpus", lambda: ["2"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert model_device() == "cuda:0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unmasked: Ray's id is the physical index
    assert model_device() == "cuda:2"
    monkeypatch.setattr(loader, "ray_assigned_gpus", lambda: None)
    assert model_device() == "cuda"
    monkeypatch.setattr(loader, "ray_assigned_gpus", list)  # []
    assert model_device() == "cpu"


def test_ray_worker_without_gpus_chooses_cpu(ray_local: Any, tiny_model_dir: Path) -> None:
    assert ray_assigned_gpus() is None  # the driver has no assignment, even with Ray up

    def probe(model_dir: str) -> tuple[list[str] | None, str, str, set[str]]:
        from rr_ray.evaluation.scoring import Scorer
        from rr_ray.models.loader import model_device, ray_assigned_gpus

        scorer = Scorer.from_model_dir(model_dir, threads=1)
        gen = scorer.generator
        return ray_assigned_gpus(), model_device(), gen.device, {p.device.type for p in gen.model.parameters()}

    task = ray_local.remote(num_cpus=1, num_gpus=0)(probe)
    assigned, device, gen_device, param_devices = ray_local.get(task.remote(str(tiny_model_dir)))
    assert assigned == []  # read as a Ray worker (not "outside Ray"), with nothing assigned
    assert device == gen_device == "cpu"
    assert param_devices == {"cpu"}


def test_hf_generator_loads_on_the_chosen_device(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rr_ray.evaluation.scoring import Scorer
    from rr_ray.generation import hf_generator
    from rr_ray.generation.base import Request, SamplingParams

    asked: list[str] = []
    real_load = hf_generator.load_model

    def spy(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> object:
        asked.append(device)
        return real_load(model_dir, dtype)  # CPU here, whatever was asked

    monkeypatch.setattr(hf_generator, "load_model", spy)
    monkeypatch.setattr(hf_generator, "model_device", lambda: "cuda:7")
    assert hf_generator.HFGenerator(tiny_model_dir, threads=1).device == "cuda:7"
    assert asked == ["cuda:7"]  # no device given: the loader's choice goes to load_model
    monkeypatch.undo()

    scorer = Scorer.from_model_dir(tiny_model_dir, threads=1)
    gen = scorer.generator
    assert gen.device == model_device() == "cpu"
    assert {p.device.type for p in gen.model.parameters()} == {"cpu"}
    assert scorer.loglik(["Hi"], [" there"])[0][1] > 0  # inputs travel to the model's device
    assert gen.generate([Request("Hi")], SamplingParams(max_new_tokens=2))[0][0].num_tokens <= 2
