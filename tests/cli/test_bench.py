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
