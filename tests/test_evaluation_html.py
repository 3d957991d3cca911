"""The evaluation HTML opened in headless Chromium: every plot decodes and renders;
a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node.cli import main
from tests.test_evaluation_cli import folders  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var out = imgs.map(function (i) { return [i.alt, i.complete, i.naturalWidth, i.naturalHeight]; });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_html_plots_render_in_chromium(
    folders: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    artifacts_dir: Path,
) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is not installed (scripts/bootstrap.sh installs it)")
    ref, res = folders
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(ref),
                "--results",
                str(res),
                "--out",
                str(out),
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    page = (out / "evaluation.html").read_text()
    n_img = page.count("<img ")
    assert n_img >= 5  # ROC, calibration, Dice box plot, FROC, worst-case overlays
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "p1")
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m is not None, dom.stderr[-2000:]
    images = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == n_img
    for alt, complete, width, height in images:
        assert complete and width > 100 and height > 100, alt
    shot = artifacts_dir / "evaluation_report.png"
    shot.unlink(missing_ok=True)
    r = _chromium(
        [f"--screenshot={shot}", "--window-size=1200,2400", (out / "evaluation.html").as_uri()],
        tmp_path / "p2",
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, r.stderr[-2000:]
