"""``hpb-node demo`` end to end on a fresh setup (pynetdicom archive, SQLite, temp folder).

The product model bundle is not part of this test: the demo runs with the
TEST-ONLY threshold pipeline standing in for the model; everything else
(synthetic case, archive, node, C-STORE, stability, queue, export, overlay PNG,
archive check) is the demo's real code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import main


def test_demo_runs_end_to_end_without_orthanc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--no-orthanc",
            "--pipeline",
            "threshold-test",
            "--pipeline-module",
            "tests.support.threshold_pipeline",
            "--timeout",
            "180",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in out
    assert "64/64 acknowledged" in out
    assert "series: complete (64 instances)" in out
    assert "outcome: 1 object (seg); sent to archive" in out
    assert "objects sent to folder archive:" in out
    assert "seg " in out and "(stored)" in out and "NOT FOUND" not in out
    png = tmp_path / "demo" / "key-slice.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_with_the_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command as a user runs it: the product pipeline and the shipped bundle."""
    code = main(["demo", "--workdir", str(tmp_path / "demo"), "--no-orthanc", "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "clinical store: " in out
    outcome = next(line for line in out.splitlines() if "outcome: " in line)
    assert "seg" in outcome and "sr" in outcome and "pdf" in outcome
    assert outcome.endswith("sent to archive")
    assert "diagnosis probabilities:" in out
    assert "report draft:" in out
    assert "(stored)" in out and "NOT FOUND" not in out
    assert (tmp_path / "demo" / "key-slice.png").is_file()
