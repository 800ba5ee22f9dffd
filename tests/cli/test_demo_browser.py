"""The demo's report opens in a real browser: headless Chromium, no console errors, a
screenshot that is not blank and shows the plots. Skips when Chromium is missing
(``make chromium`` installs Debian's package)."""

import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, shot, profile, size=(1200, 3000)) -> list[str]:
    """Render ``url`` to ``shot``; return the page's console messages (Chromium logs each
    one as an ``INFO:CONSOLE`` line on stderr with --enable-logging=stderr)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: run `make chromium` (apt-get install chromium)")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        f"--window-size={size[0]},{size[1]}",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_console_errors_are_caught(tmp_path):
    """The detector itself: a page that logs an error and throws must be flagged."""
    page = tmp_path / "bad.html"
    page.write_text("<p>x</p><script>console.error('boom'); missing();</script>")
    console = screenshot(page.as_uri(), tmp_path / "bad.png", tmp_path / "profile")
    assert any("boom" in line for line in console)
    assert any("ReferenceError" in line for line in console)


def test_demo_report_renders_in_chromium(demo_run, tmp_path):
    from PIL import Image

    _, out, _ = demo_run
    shot = tmp_path / "report.png"
    console = screenshot((out / "report.html").as_uri(), shot, tmp_path / "profile")
    assert console == []
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)  # (H, W, 3)
    assert image.shape == (3000, 1200, 3)
    ink = float((image.sum(-1) < 3 * 235).mean())
    assert ink > 0.03, f"screenshot looks blank ({ink:.1%} non-white pixels)"
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables and plots, not a flat colour

    def near(rgb, tol=40) -> int:
        return int((np.abs(image - np.array(rgb)).sum(-1) < tol).sum())

    # the plots rendered: the plain (red) and BN (blue) curves are on screen
    assert near((0xCF, 0x22, 0x2E)) > 500 and near((0x09, 0x69, 0xDA)) > 500
