import torch

from normlab.experiments.scale_invariance import Config, exactness


def test_exact_part_and_the_role_of_eps():
    ex = exactness(Config(scales=(1e-3, 10.0)), torch.Generator().manual_seed(0))
    assert max(ex["out_err"]) <= 1e-12 and max(ex["grad_err"]) <= 1e-12
    assert abs(ex["euler_cos"]) <= 1e-12
    # ε > 0 breaks the invariance once a²σ² is near ε (a = 1e-3: σ²a² ≈ 1e-6 < ε)
    assert ex["out_err_eps"][0] > 0.1 and ex["out_err_eps"][1] < 1e-4


def test_holds_in_quick_mode(quick_result):
    r = quick_result("scale-invariance")
    assert r.verdict == "holds", r.measured
    m = r.metrics
    assert m["eff_lr_ratio_decay"] > 1 > m["eff_lr_ratio_no_decay"]
    assert m["max_abs_cos_no_decay"] < 1e-3 and m["max_abs_cos_decay"] < 1e-3
