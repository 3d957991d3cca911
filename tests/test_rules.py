"""Routing rules: validation messages, all/any/not, regex, ranges, best series per study, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.series_writer import SeriesInfo, write_series
from node.cli import main
from node.errors import ConfigError
from node.rules import (
    SeriesAttributes,
    best_of,
    dry_run,
    explain_text,
    load_rules_file,
    parse_rule,
    parse_rules_document,
)

ROOT = Path(__file__).resolve().parents[1]

CT_PV = SeriesAttributes(
    modality="CT",
    body_part_examined="ABDOMEN",
    study_description="CT ABDOMEN",
    series_description="Portal venous 1.0",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness=1.0,
    instance_count=300,
    calling_ae="PACS",
    study_uid="1.2.3",
    series_uid="1.2.3.1",
)


def rule(**kw: object) -> dict[str, object]:
    return {"name": "r", "pipeline": "hpb-ct-mr", **kw}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            rule(name="liver-ct", match={"series_description": "([unclosed"}),
            "rule 'liver-ct': match.series_description: invalid regex",
        ),
        (
            rule(match={"slice_thickness": {"min": 5, "max": 1}}),
            "match.slice_thickness: min 5.0 is greater than max 1.0",
        ),
        (rule(match={"modalty": ["CT"]}), "match.modalty: Extra inputs are not permitted"),
        (
            rule(match={"not": {"image_type": []}}),
            "match.not.image_type: needs at least one non-empty value",
        ),
        (
            rule(selection={"policy": "best_per_study"}),
            "selection.order_by: best_per_study needs at least one ordering key",
        ),
        (
            rule(selection={"policy": "best", "order_by": []}),
            "selection.policy: Input should be 'every' or 'best_per_study'",
        ),
        (
            rule(selection={"study_quiet_s": 60}),
            "selection.study_quiet_s: applies only to policy best_per_study",
        ),
        (
            rule(
                selection={
                    "policy": "best_per_study",
                    "order_by": [{"attribute": "slice_thickness"}],
                    "study_quiet_s": -1,
                }
            ),
            "selection.study_quiet_s: Input should be greater than or equal to 0",
        ),
        (rule(stable_after_s=0), "stable_after_s: Input should be greater than 0"),
        ({"name": "x"}, "rule 'x': pipeline: Field required"),
        (rule(name="bad name!"), "name: 1-64 letters"),
    ],
)
def test_invalid_rules_name_field_and_reason(body: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_rule(body)
    assert expected in str(err.value)


def test_conditions_all_any_not_regex_and_ranges() -> None:
    r = parse_rule(
        rule(
            match={
                "modality": "ct",
                "series_description": "(?i)portal|venous",
                "slice_thickness": {"max": 2.5},
                "instance_count": {"min": 50},
                "any": [{"body_part_examined": ["LIVER"]}, {"study_description": "ABDOMEN"}],
                "not": {"image_type": ["LOCALIZER"]},
                "all": [{"calling_ae": ["PACS", "OTHER"]}],
            }
        )
    )
    ok, lines = r.explain(CT_PV)
    assert ok, lines
    thick = SeriesAttributes(**{**CT_PV.__dict__, "slice_thickness": 5.0})
    ok, lines = r.explain(thick)
    assert not ok
    assert any("FAIL slice_thickness: 5 mm outside [-inf, 2.5]" in line for line in lines)
    scout = SeriesAttributes(**{**CT_PV.__dict__, "image_type": ("ORIGINAL", "LOCALIZER")})
    ok, lines = r.explain(scout)
    assert not ok and any("FAIL not: inner block held" in line for line in lines)
    arterial = SeriesAttributes(**{**CT_PV.__dict__, "series_description": "Arterial"})
    assert not r.explain(arterial)[0]
    other_ae = SeriesAttributes(**{**CT_PV.__dict__, "calling_ae": "X"})
    ok, lines = r.explain(other_ae)
    assert not ok and any("FAIL all: 0/1 held" in line for line in lines)
    neither = SeriesAttributes(
        **{**CT_PV.__dict__, "body_part_examined": "HEAD", "study_description": "CT HEAD"}
    )
    ok, lines = r.explain(neither)
    assert not ok and any("FAIL any: 0/2 held" in line for line in lines)


def test_missing_slice_thickness_does_not_match_a_range() -> None:
    r = parse_rule(rule(match={"slice_thickness": {"min": 0}}))
    assert not r.explain(SeriesAttributes(modality="CT"))[0]


def test_best_series_per_study_by_declared_ordering() -> None:
    r = parse_rule(
        rule(
            selection={
                "policy": "best_per_study",
                "order_by": [
                    {"attribute": "slice_thickness"},
                    {"attribute": "instance_count", "direction": "desc"},
                ],
            }
        )
    )
    a = SeriesAttributes(series_uid="1.1", slice_thickness=3.0, instance_count=100)
    b = SeriesAttributes(series_uid="1.2", slice_thickness=1.0, instance_count=200)
    c = SeriesAttributes(series_uid="1.3", slice_thickness=1.0, instance_count=400)
    d = SeriesAttributes(series_uid="1.4", slice_thickness=None, instance_count=999)
    assert best_of(r.selection, [a, b, c, d]).series_uid == "1.3"
    assert best_of(r.selection, [a, d]).series_uid == "1.1"  # missing values sort last


def test_document_checks_destinations_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="rule 'r': destinations: 'nowhere' is not a declared destination"
    ):
        parse_rules_document(
            {
                "rules": [rule(destinations=["nowhere"])],
                "destinations": [{"name": "pacs", "kind": "dicomweb", "url": "http://x/dicom-web"}],
            }
        )
    with pytest.raises(ConfigError, match="rule 'r' is defined twice"):
        parse_rules_document({"rules": [rule(), rule()]})
    with pytest.raises(ConfigError, match="destination 'p': ae_title"):
        parse_rules_document(
            {"destinations": [{"name": "p", "kind": "dimse", "host": "h", "port": 1}]}
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="cannot read rules file"):
        load_rules_file(bad)


def test_example_rules_file_is_valid_and_routes_us() -> None:
    ruleset = load_rules_file(ROOT / "examples" / "rules.yaml")
    names = [r.name for r in ruleset.ordered()]
    assert names == ["liver-ct", "liver-mr", "abdominal-us"]
    us = SeriesAttributes(modality="US", instance_count=1)
    text = explain_text(ruleset.rules, us)
    assert "matched: abdominal-us" in text
    assert "FAIL modality: 'US' not in ['CT']" in text


def test_dry_run_for_the_admin_api() -> None:
    rows = [
        {
            "name": "ct",
            "priority": 1,
            "enabled": True,
            "definition": {"pipeline": "p", "match": {"modality": ["CT"]}},
        }
    ]
    out = dry_run(
        rows, {"Modality": "CT", "SeriesDescription": "x", "ImageType": "ORIGINAL\\PRIMARY"}
    )
    assert out["matched"] == ["ct"]
    assert out["rules"][0]["explanation"] == ["ok   modality: 'CT' in ['CT']"]
    with pytest.raises(ConfigError, match="unknown series attribute"):
        dry_run(rows, {"Nope": 1})


def test_cli_validate_and_test_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "series"
    write_series(
        np.zeros((3, 8, 8), dtype=np.int16),
        np.diag([0.8, 0.8, 1.0, 1.0])[[2, 1, 0, 3]],
        folder,
        info=SeriesInfo(series_description="PORTAL VENOUS 1mm", body_part="ABDOMEN"),
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: thin-pv, pipeline: hpb-ct-mr, match: {modality: CT, series_description: '(?i)portal', slice_thickness: {max: 2}}}\n"
        "  - {name: mr-only, pipeline: hpb-ct-mr, match: {modality: MR}}\n"
    )
    assert main(["rules", "validate", str(rules)]) == 0
    assert "2 rule(s), 0 destination(s) valid" in capsys.readouterr().out
    assert main(["rules", "test", str(folder), "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "matched: thin-pv" in out
    assert "rule 'mr-only' (priority 100): not matched" in out
    assert "FAIL modality: 'CT' not in ['MR']" in out
    assert "ok   series_description: 'PORTAL VENOUS 1mm' matches /(?i)portal/" in out
    assert "instances=3" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: liver-ct, pipeline: p, match: {series_description: '(['}}\n")
    assert main(["rules", "validate", str(bad)]) == 2
    assert "rule 'liver-ct': match.series_description: invalid regex" in capsys.readouterr().err
