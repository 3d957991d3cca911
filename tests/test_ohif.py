"""The node's SEG and TID 1500 SR in the real OHIF viewer (3.12.10, headless Chromium).

A CT series and the objects dicom_sr builds from its findings (the node's
``build_all``: SEG, SR, PDF, SC, KOS) are stored in a real Orthanc; the built
OHIF viewer (tests/ohif, @ohif/app dist) is served with Orthanc's DICOMweb on
the same origin (tests/support/ohif_server.py) and driven by playwright-core
(tests/ohif/ohif_check.cjs). The assertions read what the page shows: segment
labels in the segmentation panel, coloured overlay pixels on the viewport,
measurement text drawn on the SR's key slice, and no error boundary at any
console level (OHIF 3.12 logs it at console.debug only). Screenshots are kept
in test-artifacts/ohif/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.support.ohif_server import DIST, OHIF_DIR, OhifServer
from tests.test_dicom_sr_outputs import Case, build_case
from tests.test_orthanc_plugin import AUTH, start_orthanc, stop_orthanc

pytestmark = [pytest.mark.browser, pytest.mark.orthanc, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
IMAGING_MEASUREMENTS = "126010"
LONG_AXIS = "103339001"


def chromatic_pixels(png: Path) -> int:
    """Pixels whose colour is clearly not grey (overlays; the CT itself is grey)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def error_boundaries(result: dict[str, Any]) -> list[str]:
    found = [f"[{m['type']}] {m['text'][:300]}" for m in result["console"]]
    return [m for m in found if "Error Boundary" in m] + result["pageErrors"]


def sr_expectations(
    sr: pydicom.Dataset, sources: list[pydicom.Dataset]
) -> tuple[set[str], set[int]]:
    """Long-axis texts ("18.97 mm") and key-slice InstanceNumbers of the SR's planar groups."""
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in sources}
    texts: set[str] = set()
    slices: set[int] = set()
    container = next(
        i
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS
    )
    for group in container.ContentSequence:
        items = list(getattr(group, "ContentSequence", []))
        scoords = [i for i in items if i.ValueType == "SCOORD"]
        if not scoords:
            continue
        for ref in scoords[0].ContentSequence:
            slices.add(numbers[str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)])
        for i in items:
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == LONG_AXIS:
                value = float(i.MeasuredValueSequence[0].NumericValue)
                texts.add(f"{value:.2f} mm")
    return texts, slices


@pytest.fixture(scope="module")
def viewer_run(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path
) -> Iterator[tuple[Case, dict[str, dict[str, Any]], Path, list[tuple[str, str, int]]]]:
    if shutil.which("node") is None or not CHROMIUM.exists():
        pytest.skip("node or /usr/bin/chromium missing (scripts/bootstrap.sh --test)")
    if not (DIST / "index.html").exists():
        pytest.skip("tests/ohif/node_modules missing: run scripts/bootstrap.sh --test (npm ci)")
    work = tmp_path_factory.mktemp("ohif")
    case = build_case(shared_data, work / "case")
    out = artifacts_dir / "ohif"
    out.mkdir(parents=True, exist_ok=True)
    orth = start_orthanc(work / "orthanc", 9, {"Enabled": False})
    try:
        files = [*case.source_paths, *(p for ps in case.paths.values() for p in ps)]
        for p in files:
            orth.client.post("/instances", content=p.read_bytes()).raise_for_status()
        study = str(case.sources[0].StudyInstanceUID)
        with OhifServer(orth.url, AUTH) as server:
            plan = {
                "viewerUrl": server.url,
                "studyUid": study,
                "outDir": str(out),
                "timeoutMs": 30000,
                "chromium": str(CHROMIUM),
                "scenarios": [
                    {"name": "seg", "kind": "seg", "series": "AI SEG"},
                    {"name": "sr", "kind": "sr", "series": "AI measurements"},
                ],
            }
            plan_path = work / "plan.json"
            plan_path.write_text(json.dumps(plan))
            done = subprocess.run(
                ["node", str(OHIF_DIR / "ohif_check.cjs"), str(plan_path)],
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
            )
            assert done.returncode == 0, f"driver failed: {done.stderr[-3000:]}"
            answer = json.loads(done.stdout)
            results = {r["name"]: r for r in answer["results"]}
            (out / "console.json").write_text(json.dumps(answer, indent=1))
            yield case, results, out, list(server.proxied)
    finally:
        stop_orthanc(orth)


def test_seg_opens_as_overlay_with_its_segment_labels(
    viewer_run: tuple[Case, dict[str, dict[str, Any]], Path, list[tuple[str, str, int]]],
) -> None:
    case, results, out, proxied = viewer_run
    seg = results["seg"]
    assert seg["error"] is None, seg["error"]
    assert error_boundaries(seg) == []
    seg_ds = case.paths["seg"][0]
    labels = [str(s.SegmentLabel) for s in pydicom.dcmread(seg_ds).SegmentSequence]
    shown = seg["segments"]
    assert len(shown) == len(labels)
    for number, label in enumerate(labels, start=1):
        assert f"{number} {label}" in shown
    # the overlay is drawn: coloured pixels where the CT alone has none
    before = chromatic_pixels(out / "seg-before.png")
    after = chromatic_pixels(out / "seg.png")
    assert after > before + 2000, (before, after)
    seg_uid = str(pydicom.dcmread(seg_ds, stop_before_pixels=True).SeriesInstanceUID)
    assert any(seg_uid in p and status == 200 for _, p, status in proxied)


# Known defect in dicom_sr's SR (found by this test, reported to the outputs engineer):
# (a) measurement groups with no image coordinates (organ volumetric groups,
#     diagnosis and clinical-input groups) make OHIF 3.12 crash in
#     _checkIfCanAddMeasurementsToDisplaySet (coords[0] undefined: "Route viewer
#     Error Boundary TypeError ... 'ReferencedSOPSequence'", console.debug);
# (b) each lesion's volumetric and planar groups share one TrackingUniqueIdentifier;
#     OHIF merges them and takes the volumetric group's SCOORD3D centroid as the
#     graphic, calls the SR "not compatible" and draws nothing on the key slice.
# strict: the test fails as soon as the SR is fixed, so this mark gets removed.
@pytest.mark.xfail(
    strict=True, reason="dicom_sr SR groups without image coordinates crash OHIF 3.12 (see above)"
)
def test_sr_draws_lesion_measurements_on_their_key_slices(
    viewer_run: tuple[Case, dict[str, dict[str, Any]], Path, list[tuple[str, str, int]]],
) -> None:
    case, results, out, _ = viewer_run
    sr = results["sr"]
    assert error_boundaries(sr) == [], "OHIF crashed opening the SR"
    assert sr["error"] is None, sr["error"]
    assert "not compatible" not in sr["bodyText"], "OHIF calls the SR not compatible"
    sr_ds = pydicom.dcmread(case.paths["sr"][0])
    texts, slices = sr_expectations(sr_ds, case.sources)
    assert texts and slices
    assert any(t in sr["viewportText"] for t in texts), (texts, sr["viewportText"])
    assert any(sr["slice"].startswith(f"I:{n} ") for n in slices), (slices, sr["slice"])
    before = chromatic_pixels(out / "sr-before.png")
    after = chromatic_pixels(out / "sr.png")
    assert after > before + 50, (before, after)
