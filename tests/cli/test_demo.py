import json
import subprocess
import sys

from normlab.cli import main


def test_demo_json(capsys):
    main(["demo", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [round(v, 3) for v in out["worked_example"]["y"]] == [-1.683, 0.106, 1.894, 3.683]
    assert all(row["normlab_max_err"] <= 1e-4 for row in out["offset_accuracy"])
    assert out["nan_batch"]["normlab_running_mean_finite"] is True


def test_python_dash_m_and_version():
    r = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("normlab ")


def test_unknown_command_says_what_to_type(capsys):
    try:
        main(["dmeo"])
    except SystemExit as e:
        assert e.code != 0
    err = capsys.readouterr().err
    assert "No such command" in err
