import json

import jsonschema
import pytest
import torch
from torch import nn

from normlab.bench import models, zoo
from normlab.report import write_json

_timing = {
    "type": "object",
    "required": [
        "seconds",
        "min",
        "max",
        "spread",
        "samples",
        "torch_over",
        "cpu_seconds",
        "cpu_samples",
        "cpu_torch_over",
    ],
    "properties": {
        "seconds": {"type": "number", "exclusiveMinimum": 0},
        "samples": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
        "torch_over": {"type": "number", "exclusiveMinimum": 0},
        "cpu_seconds": {"type": "number", "minimum": 0},
        "cpu_samples": {"type": "array", "items": {"type": "number", "minimum": 0}},
    },
}
_saved = {
    "type": ["object", "null"],
    "required": ["bytes", "storages", "tensors", "param_bytes", "activation_bytes"],
    "additionalProperties": {"type": "integer", "minimum": 0},
}
_rss = {
    "type": ["object", "null"],
    "required": [
        "method",
        "setup_bytes",
        "kernel_load_bytes",
        "retained_bytes",
        "peak_bytes",
        "training_bytes",
    ],
}
VARIANT = {
    "type": "object",
    "required": [
        "compiled",
        "inplace",
        "inplace_note",
        "first_loss",
        "loss_rel_diff",
        "loss_rel_err_f64",
        "graph_breaks",
        "train",
        "eval",
        "saved",
        "rss",
    ],
    "properties": {"train": _timing, "eval": _timing, "saved": _saved, "rss": _rss},
}
RUN = {
    "type": "object",
    "required": [
        "model",
        "batch",
        "size",
        "classes",
        "memory_format",
        "dtype",
        "params",
        "repeats",
        "warmup",
        "inplace_mode",
        "variants",
        "skipped",
        "loss_check",
    ],
    "properties": {
        "variants": {"type": "object", "minProperties": 2, "additionalProperties": VARIANT},
        "loss_check": {
            "type": "object",
            "required": ["rtol", "max_rel_diff", "ok", "reference_loss"],
        },
    },
}

# resnet18 at batch 4 (not 2): at 32x32 its last stage is 1x1, where batch 2 leaves each
# batch norm two values per channel, a variance below eps, and float32 rounding (torch's
# or normlab's alike) amplified to ~2e-4 in the loss — past the check's 1e-4.
TINY = {
    "resnet18": models.ModelCase("resnet18", batch=4, size=32, classes=10),
    "mobilenet_v2": models.ModelCase("mobilenet_v2", batch=2, size=32, classes=10),
    "resnet18_leaky": models.ModelCase("resnet18_leaky", batch=4, size=32, classes=10),
}


@pytest.fixture(scope="module")
def tiny_runs():
    return {
        name: models.run_model(case, repeats=2, warmup=0, rss=False) for name, case in TINY.items()
    }


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_run_writes_valid_json_with_every_field(tiny_runs, name, tmp_path):
    write_json(tmp_path / "run.json", tiny_runs[name])
    run = json.loads((tmp_path / "run.json").read_text())
    jsonschema.validate(run, RUN)
    assert run["model"] == name and run["params"] > 0
    assert list(run["variants"]) == list(models.eager_variants(name))
    for v in run["variants"].values():
        assert len(v["train"]["samples"]) == len(v["eval"]["samples"]) == 2
        assert len(v["train"]["cpu_samples"]) == 2
        assert v["train"]["min"] <= v["train"]["seconds"] <= v["train"]["max"]
        saved = v["saved"]
        assert saved["activation_bytes"] + saved["param_bytes"] == saved["bytes"]
        assert 0 < saved["storages"] <= saved["tensors"]
        assert v["inplace"] is True  # these sizes run normlab's in-place-safe path
    assert run["variants"]["torch"]["train"]["torch_over"] == 1.0
    assert run["variants"]["torch"]["loss_rel_diff"] == 0.0
    assert run["loss_check"]["ok"], run["loss_check"]
    # both float32 losses are close to the float64 one
    assert all(v["loss_rel_err_f64"] < 1e-4 for v in run["variants"].values())
    if "normlab+fuse" not in run["variants"]:
        assert "normlab+fuse" in run["skipped"]


class Tiny(nn.Module):
    """conv → BN → ReLU → mean → linear: a zoo-compatible model that runs in milliseconds."""

    def __init__(self, *, num_classes=10, norm_layer=None, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = (norm_layer or nn.BatchNorm2d)(8)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.relu(self.bn1(self.conv1(x))).mean((2, 3)))


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(zoo.MODELS, "tiny", Tiny)
    return models.ModelCase("tiny", batch=4, size=8, classes=5)


@pytest.fixture
def normlab_refuses_inplace(monkeypatch):
    """The normlab variant fails as a layer returning a view does under an in-place ReLU:
    after a forward (running statistics updated), with autograd's message."""
    real = models.build_variant

    class Refuses(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner(x)
            raise RuntimeError(
                "Output 0 of _Fake is a view and is being modified inplace. This view was "
                "created inside a custom Function"
            )

    def build(name, base, inplace):
        model = real(name, base, inplace)
        return Refuses(model) if name == "normlab" and inplace else model

    monkeypatch.setattr(models, "build_variant", build)


def test_inplace_auto_rebuilds_a_variant_that_refuses_inplace(tiny_model, normlab_refuses_inplace):
    run = models.run_model(tiny_model, repeats=1, warmup=0, rss=False)
    assert run["variants"]["torch"]["inplace"] is True
    ours = run["variants"]["normlab"]
    assert ours["inplace"] is False
    assert "modified inplace" in ours["inplace_note"]
    # rebuilt from the shared weights: the same first loss as torch's
    assert run["loss_check"]["ok"], run["loss_check"]


def test_inplace_on_raises_and_off_turns_every_variant_off(tiny_model, normlab_refuses_inplace):
    with pytest.raises(RuntimeError, match="modified inplace"):
        models.run_model(tiny_model, repeats=1, warmup=0, rss=False, inplace="on")
    run = models.run_model(tiny_model, repeats=1, warmup=0, rss=False, inplace="off")
    assert {v["inplace"] for v in run["variants"].values()} == {False}


def test_variants_start_from_the_base_models_state(tiny_model):
    base = models.base_model(tiny_model)
    ours = models.build_variant("normlab", base, inplace=False)
    assert type(ours.bn1).__module__.startswith("normlab.")
    for (k, a), b in zip(base.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    assert not ours.relu.inplace and base.relu.inplace  # base untouched


def test_channels_last_case_runs_in_channels_last(tiny_model):
    case = models.ModelCase("tiny", batch=4, size=8, classes=5, memory_format="channels_last")
    base = models.base_model(case)
    x, _ = models.batch(case)
    assert base.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    run = models.run_model(case, repeats=1, warmup=0, rss=False)
    assert run["memory_format"] == "channels_last" and run["loss_check"]["ok"]


@pytest.mark.slow  # dynamo's first capture in a process: ~8 s on a loaded 2-core box
def test_compiled_variants_are_timed_but_not_memory_profiled(tiny_model):
    # backend="eager": dynamo's capture without inductor's minutes-long code generation
    run = models.run_model(
        tiny_model, repeats=1, warmup=0, rss=False, compile=True, compile_backend="eager"
    )
    assert run["warmup"] == 2  # compiled frames settle in two rounds
    compiled = [n for n, v in run["variants"].items() if v["compiled"]]
    assert compiled == [f"{n}+compile" for n in models.eager_variants()]
    for name in compiled:
        v = run["variants"][name]
        assert v["saved"] is None and v["rss"] is None
        assert isinstance(v["graph_breaks"], int)
        assert v["loss_rel_diff"] <= models.LOSS_RTOL
    assert torch._dynamo.config.recompile_limit == 8  # restored


def test_rss_is_measured_per_eager_variant_with_its_inplace_setting(
    tiny_model, normlab_refuses_inplace, monkeypatch
):
    calls = []

    def fake(case, variant, *, inplace, warmup, steps, seed):
        calls.append((variant, inplace, warmup, steps))
        return {"peak_bytes": len(calls)}

    monkeypatch.setattr(models, "measure_rss", fake)
    run = models.run_model(tiny_model, repeats=1, warmup=0, rss_steps=2)
    assert calls[:2] == [("torch", True, 1, 2), ("normlab", False, 1, 2)]
    assert run["variants"]["normlab"]["rss"] == {"peak_bytes": 2}


@pytest.mark.slow  # a fresh interpreter importing torch and loading the kernels: 5-11 s
def test_measure_rss_in_a_subprocess():
    case = models.ModelCase("mobilenet_v3_small", batch=2, size=32, classes=10)
    rss = models.measure_rss(case, "normlab", inplace=True, warmup=1, steps=1)
    assert "VmHWM" in rss["method"]  # the peak was reset after the warm-up
    assert 0 < rss["setup_bytes"] <= rss["retained_bytes"] <= rss["peak_bytes"]
    assert rss["kernel_load_bytes"] >= 0
    assert rss["training_bytes"] == (
        rss["peak_bytes"] - rss["setup_bytes"] - rss["kernel_load_bytes"]
    )


def test_bad_cases_name_the_argument():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*resnet18"):
        models.ModelCase("vgg")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        models.ModelCase("resnet18", memory_format="nhwc")
    with pytest.raises(ValueError, match="batch must be >= 2"):
        models.ModelCase("resnet18", batch=1)
    with pytest.raises(ValueError, match="inplace must be one of"):
        models.run_model(models.ModelCase("resnet18"), inplace="yes")


def test_save_output_variant_keeps_about_half_the_activations(tiny_runs):
    # In-Place ABN on the LeakyReLU ResNet-18: each fused layer keeps only its output,
    # which the next convolution saves anyway, and each downsample BN keeps the residual
    # its fused add keeps. Issue 12's target, <= 0.6x torch's bytes, is for batch 32 at
    # 112x112 (0.58x, benchmarks/README.md); it holds at this tiny size too.
    variants = tiny_runs["resnet18_leaky"]["variants"]
    assert (
        models.SAVE_OUTPUT in variants
        and models.SAVE_OUTPUT not in tiny_runs["resnet18"]["variants"]
    )
    torch_bytes = variants["torch"]["saved"]["activation_bytes"]
    ratio = variants[models.SAVE_OUTPUT]["saved"]["activation_bytes"] / torch_bytes
    assert ratio <= 0.6, ratio  # 0.57 at this size
    assert variants["normlab+fuse"]["saved"]["activation_bytes"] / torch_bytes > 0.9
    assert variants[models.SAVE_OUTPUT]["loss_rel_diff"] <= models.LOSS_RTOL
