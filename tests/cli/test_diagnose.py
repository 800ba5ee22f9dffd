import json
import sys
import textwrap

import pytest

from normlab.cli import main

SAMPLE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        layers = []
        for i in range(6):
            lin = nn.Linear(8 if i == 0 else 32, 32)
            nn.init.normal_(lin.weight, 0.0, 1.5)  # far too large: sigmoid inputs saturate
            layers += [lin, nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(32, 4))

    def batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    """
)


def write(tmp_path, text, name="net.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_diagnose_table(tmp_path, capsys):
    main(["diagnose", str(write(tmp_path, SAMPLE))])
    out = capsys.readouterr().out
    assert "0 Linear" in out and "saturated" in out and "problems found" in out
    assert "Insert BatchNorm before the sigmoid in layers 1–6" in " ".join(out.split())
    assert not any(name.startswith("_normlab_diagnose_") for name in sys.modules)


def test_diagnose_json_with_loss_fn_and_eval(tmp_path, capsys):
    text = SAMPLE.replace("nn.Sigmoid()", "nn.BatchNorm1d(32), nn.Sigmoid()") + textwrap.dedent(
        """
        calls = []

        def loss_fn(output, target):
            calls.append(1)
            return nn.functional.cross_entropy(output, target)
        """
    )
    path = write(tmp_path, text)
    main(["diagnose", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == str(path)
    assert out["healthy"] is True
    kinds = [layer["kind"] for layer in out["layers"]]
    assert kinds[:2] == ["Linear", "BatchNorm1d"] and len(kinds) == 13
    assert out["flow"]["layers"][1]["preact"]["saturated_fraction"] == 0.0
    main(["diagnose", str(path), "--json", "--eval"])  # running stats (0, 1): not normalised
    out = json.loads(capsys.readouterr().out)
    assert out["flow"]["layers"][1]["preact"]["saturated_fraction"] > 0.25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x = 1\n", "must define model(), returning a torch.nn.Module; found nothing"),
        ("def model():\n    return 3\n", "model() must return a torch.nn.Module, got int"),
        (
            "import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n",
            "must define batch(), returning (inputs, target) or an inputs tensor",
        ),
        ("raise RuntimeError('broken import')\n", "importing it raised RuntimeError: broken"),
        (
            "import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n"
            "def batch():\n    return torch.randn(4, 2)\n",
            "the batch has no target, so pass loss_fn(output)",
        ),
    ],
    ids=["no-model", "not-a-module", "no-batch", "import-error", "no-target"],
)
def test_diagnose_errors_say_what_the_file_must_define(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", str(write(tmp_path, text))])
    assert e.value.code == 1
    assert message in " ".join(capsys.readouterr().err.split())


def test_diagnose_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", str(tmp_path / "nope.py")])
    assert "nope.py:nosuchfile" in "".join(capsys.readouterr().err.split())  # rich wraps
