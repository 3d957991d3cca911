"""OHIF's own DICOM libraries load our SEG and SR (Node.js, tests/js).

tests/js/check_outputs.mjs is bundled with esbuild and run by node: it calls
``createFromDICOMSegBuffer`` (@cornerstonejs/adapters 4.15.29, the call OHIF 3.12
makes to load a SEG) and ``MeasurementReport.generateToolState`` (the SR
hydration call), with a Cornerstone metadata provider built from the source
files by dcmjs 0.49.4.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dicom_sr import OutputOptions, build_seg
from tests.test_dicom_sr_outputs import Case, build_case

JS_DIR = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (scripts/bootstrap.sh --test installs it)")
    esbuild = JS_DIR / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        pytest.skip("tests/js/node_modules missing: run scripts/bootstrap.sh --test (npm ci)")
    out = tmp_path_factory.mktemp("js") / "check_outputs.mjs"
    subprocess.run(
        [
            str(esbuild),
            "check_outputs.mjs",
            "--bundle",
            "--platform=node",
            "--format=esm",
            f"--outfile={out}",
            "--log-level=warning",
        ],
        cwd=JS_DIR,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module")
def case(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return build_case(shared_data, tmp_path_factory.mktemp("js-case"))


def run_node(bundle: Path, tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    path = tmp / "manifest.json"
    path.write_text(json.dumps(manifest))
    res = subprocess.run(
        ["node", str(bundle), str(path)], capture_output=True, text=True, timeout=180, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def test_ohif_loads_binary_seg_and_sr(bundle: Path, case: Case, tmp_path: Path) -> None:
    (seg_path,) = case.paths["seg"]
    (sr_path,) = case.paths["sr"]
    out = run_node(
        bundle,
        tmp_path,
        {"seg": str(seg_path), "sr": str(sr_path), "sources": [str(p) for p in case.source_paths]},
    )
    f = case.findings
    masks = [o.mask for o in f.organs] + [les.mask for les in f.lesions]
    seg = out["seg"]
    assert seg["segmentCount"] == len(masks)
    assert seg["labels"][:4] == ["Liver", "Pancreas", "Gallbladder", "Spleen"]
    assert seg["labels"][4].startswith("Lesion 1")
    assert seg["overlapping"] is True  # lesions lie inside the liver: OHIF uses layers
    for number, mask in enumerate(masks, start=1):
        assert seg["voxelCounts"][str(number)] == int(mask.sum()), f"segment {number}"

    annotations = out["sr"]["annotations"]
    assert [a["toolType"] for a in annotations] == ["Bidirectional"] * len(f.lesions)
    for a, les in zip(annotations, f.lesions, strict=True):
        assert a["length"] == pytest.approx(les.long_axis.length_mm)
        assert a["width"] == pytest.approx(les.short_axis.length_mm)
        assert a["unit"] == "mm"
        key_uid = f.provenance.input_sop_uids[les.key_slice]
        assert a["referencedImageId"] == f"hpb:{key_uid}:1"
        assert len(a["points"]) == 4


def test_ohif_loads_labelmap_seg(bundle: Path, case: Case, tmp_path: Path) -> None:
    seg = build_seg(
        case.findings, case.sources, options=OutputOptions(pipeline_version="lm", labelmap=True)
    )
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path, enforce_file_format=True)
    out = run_node(
        bundle, tmp_path, {"seg": str(path), "sources": [str(p) for p in case.source_paths]}
    )
    f = case.findings
    numbers = [n for n in out["seg"]["numbers"] if n != 0]  # 0: the label map's background
    assert numbers == list(range(1, len(f.organs) + len(f.lesions) + 1))
    lesion_voxels = sum(int(les.mask.sum()) for les in f.lesions)
    liver = f.organs[0]
    # in a label map the lesions are painted over the liver
    assert out["seg"]["voxelCounts"]["1"] == int(liver.mask.sum()) - lesion_voxels
    assert out["seg"]["overlapping"] is False
