import json

import jsonschema

from normlab.cli import main

_seconds = {
    "type": "object",
    "required": ["normlab", "torch", "copy"],
    "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
}
_phase = {
    "type": "object",
    "required": ["seconds", "torch_over_normlab", "normlab_copies", "torch_copies"],
    "properties": {"seconds": _seconds},
}
_saved = {
    "type": "object",
    "required": ["bytes", "tensors", "activation_sized"],
    "properties": {"activation_sized": {"type": "integer", "minimum": 0}},
}
SCHEMA = {
    "type": "object",
    "required": ["environment", "jit", "cases", "repeats", "seconds"],
    "properties": {
        "jit": {
            "type": "object",
            "required": ["seconds", "cache_hits", "cache_misses"],
            "properties": {"seconds": {"type": "number", "minimum": 0}},
        },
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "normlab_path", "train", "eval", "saved"],
                "properties": {
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "train": _phase,
                    "eval": _phase,
                    "saved": {
                        "type": "object",
                        "required": ["normlab", "torch", "activation_bytes"],
                        "properties": {"normlab": _saved, "torch": _saved},
                    },
                },
            },
        },
    },
}


def test_bench_quick_writes_valid_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNELS", "numba")  # tiny shapes: make sure kernels run
    main(["bench", "--quick", "--repeats", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "first call" in printed and "bench.json" in printed
    results = json.loads((tmp_path / "bench.json").read_text())
    jsonschema.validate(results, SCHEMA)
    assert {c["normlab_path"] for c in results["cases"]} == {"kernel-cf", "kernel-cl"}
    for case in results["cases"]:
        # measured, not asserted on timing: the fused layer keeps one activation-sized
        # tensor for backward, torch's BN + ReLU two
        assert case["saved"]["normlab"]["activation_sized"] == 1
        assert case["saved"]["torch"]["activation_sized"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


def test_bench_unknown_case_names_the_choices(capsys):
    try:
        main(["bench", "--quick", "--case", "resnet"])
    except SystemExit as e:
        assert e.code != 0
    err = capsys.readouterr().err
    assert "unknown case" in err and "'conv'" in err


def test_bench_model_quick_writes_models_json_and_plot(tmp_path, capsys):
    import torch

    from tests.bench.test_models import RUN

    threads = torch.get_num_threads()
    # one thread: on a loaded 2-core box two-thread OpenMP regions stall for seconds
    args = ["--model", "resnet18", "--quick", "--repeats", "1", "--warmup", "0", "--no-rss"]
    main(["bench", *args, "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored for in-process callers
    printed = capsys.readouterr().out
    assert "resnet18, batch 4, 32×32" in printed and "normlab" in printed
    assert "models.json" in printed
    results = json.loads((tmp_path / "models.json").read_text())
    assert results["kind"] == "models" and results["environment"]["threads"] == 1
    (run,) = results["runs"]
    jsonschema.validate(run, RUN)
    assert (run["batch"], run["size"], run["classes"]) == (4, 32, 10)
    assert (tmp_path / "models.png").read_bytes().startswith(b"\x89PNG")


def test_bench_model_exits_nonzero_when_losses_disagree(monkeypatch, capsys):
    from normlab.bench import models

    def disagreeing(case, **kwargs):
        timing = {"seconds": 0.1, "spread": 0.0, "torch_over": 1.0, "cpu_torch_over": 1.0}
        variant = {
            "inplace": True,
            "inplace_note": None,
            "train": timing,
            "eval": timing,
            "saved": None,
            "rss": None,
        }
        return {
            **{"model": case.model, "memory_format": case.memory_format},
            **{"batch": case.batch, "size": case.size},
            "variants": {
                "torch": {**variant, "loss_rel_diff": 0.0, "loss_rel_err_f64": 1e-6},
                "normlab": {**variant, "loss_rel_diff": 3e-3, "loss_rel_err_f64": 3e-3},
            },
            "loss_check": {"rtol": 1e-4, "max_rel_diff": 3e-3, "ok": False},
        }

    monkeypatch.setattr(models, "run_model", disagreeing)
    try:
        main(["bench", "--model", "mobilenet_v2", "--no-rss"])
    except SystemExit as e:
        assert e.code == 1
    else:
        raise AssertionError("expected exit code 1")
    err = capsys.readouterr().err
    assert "first-step losses differ from torch's by 3.0e-03" in err
    assert "normlab 3.0e-03" in err  # against float64: which side is off


def test_bench_model_options_are_checked(capsys):
    for argv, message in (
        (["--model", "vgg"], "unknown model ['vgg']"),
        (["--model", "resnet18", "--memory-format", "nhwc"], "unknown memory format"),
        (["--model", "resnet18", "--case", "mlp"], "--case and --paths choose layer cases"),
        (["--model", "resnet18", "--inplace", "maybe"], "--inplace must be one of"),
        (["--batch", "8"], "--batch apply to --model"),
    ):
        try:
            main(["bench", *argv])
        except SystemExit as e:
            assert e.code != 0
        assert message in capsys.readouterr().err, argv
