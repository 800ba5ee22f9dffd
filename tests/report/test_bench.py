from normlab.report.bench import models_figure, write_models_plot


def _timing(ms, torch_ms):
    s = ms / 1e3
    return {
        "seconds": s,
        "min": 0.9 * s,
        "max": 1.2 * s,
        "spread": 0.3,
        "samples": [s],
        "torch_over": torch_ms / ms,
    }


def _results():
    def variants(torch_ms):
        return {
            name: {"train": _timing(ms, torch_ms), "eval": _timing(ms / 3, torch_ms / 3)}
            for name, ms in (("torch", torch_ms), ("normlab", 0.8 * torch_ms))
        }

    runs = [
        {"model": "resnet18", "memory_format": fmt, "batch": 32, "size": 112, "variants": v}
        for fmt, v in (("contiguous", variants(500.0)), ("channels_last", variants(400.0)))
    ]
    runs[1]["variants"]["torch+compile"] = {
        "train": _timing(300.0, 400.0),
        "eval": _timing(90.0, 400.0 / 3),
    }
    return {"environment": {"threads": 2}, "repeats": 7, "runs": runs}


def test_one_bar_per_variant_and_run_labelled_with_its_ratio():
    fig = models_figure(_results())
    train, evaluation = fig.axes[:2]
    assert len(train.patches) == len(evaluation.patches) == 5  # 2 + 3 variants
    labels = {t.get_text() for t in train.texts}
    assert {"1.00×", "1.25×", "1.33×"} <= labels
    assert [t.get_text() for t in train.get_xticklabels()] == [
        "resnet18\ncontiguous",
        "resnet18\nchannels_last",
    ]


def test_plot_is_written_atomically_and_reproducibly(tmp_path):
    path = write_models_plot(tmp_path / "models.png", _results())
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    assert write_models_plot(path, _results()).read_bytes() == first  # no timestamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.png"]
