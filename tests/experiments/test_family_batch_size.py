def test_errors_for_every_norm_and_batch_size(quick_result):
    err = quick_result("family-batch-size").metrics["test_error"]
    assert set(err) == {"bn", "gn", "ln", "in"}
    assert all(0.0 <= e <= 1.0 for per_batch in err.values() for e in per_batch.values())
    assert all(set(per_batch) == {"32", "4"} for per_batch in err.values())
