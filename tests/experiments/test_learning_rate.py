def test_one_accuracy_per_rate(quick_result):
    m = quick_result("learning-rate").metrics
    assert len(m["rates"]) == len(m["test_accuracy"]["bn"]) == len(m["test_accuracy"]["none"])


def test_bn_at_least_as_good_at_every_rate(quick_result):
    acc = quick_result("learning-rate").metrics["test_accuracy"]
    assert all(b >= p for b, p in zip(acc["bn"], acc["none"], strict=True))
