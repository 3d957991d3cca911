"""Routing rules: which pipeline runs on which series, and where results go.

Rules are declarative (YAML, validated with pydantic, kept in the database as
:class:`node.db.RuleRow`). A rule matches series attributes with conditions
combined by ``all`` / ``any`` / ``not``::

    rules:
      - name: liver-ct
        priority: 10
        match:
          modality: [CT]
          series_description: "(?i)portal|venous"
          slice_thickness: {min: 0.5, max: 5}
          not: {image_type: [LOCALIZER]}
        pipeline: hpb-ct-mr
        destinations: [pacs]
        selection: {policy: best_per_study, order_by: [{attribute: slice_thickness}]}
        stable_after_s: 20
    destinations:
      - {name: pacs, kind: dimse, ae_title: ORTHANC, host: 127.0.0.1, port: 4242}

Conditions (every one given must hold): ``modality``, ``body_part_examined``,
``calling_ae`` (one of the listed values, case-insensitive), ``study_description``
and ``series_description`` (a regular expression searched in the text, compiled
once when the rule is loaded), ``image_type`` (every listed value present in
ImageType), ``slice_thickness`` and ``instance_count`` (``{min, max}``, both
inclusive), and the combinators ``all`` (list), ``any`` (list), ``not`` (one).

Selection: ``every`` matching series gets a job, or only the ``best_per_study``:
among the complete series of a study that match the rule, the first by the
declared ``order_by`` (attribute and direction) wins. Nothing is evaluated.
The choice waits until the study is quiet (no series of it still receiving, and
no instance for ``selection.study_quiet_s`` seconds if set); one study gets at
most one live job per rule. A better series completing later replaces a job
that is still queued (cancelled, audited ``job.superseded``); once a worker has
taken the job, the later series is noted "not selected" (audited
``series.not_selected``) and gets none. :mod:`node.stability` applies this.

Where rules live: the database (:class:`node.db.RuleRow`), which the sweep reads.
:func:`sync_to_database` makes the rules the file manages (``source: file``)
equal to the rules file: it creates and updates them and deletes, audited as
``rule.remove``, those the file no longer defines. Rules created through the
admin API (``source: api``) are never deleted by a file load; a file rule of the
same name takes one over.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from node.errors import ConfigError
from node.registry import slice_thickness_of

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AE = re.compile(r"^[^\\]{1,16}$")


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class SeriesAttributes:
    """What rules see of a series (from the database, a folder or a dict)."""

    modality: str = ""
    body_part_examined: str = ""
    study_description: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    instance_count: int = 0
    calling_ae: str = ""
    study_uid: str = ""
    series_uid: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SeriesAttributes:
        """From a dict using the field names or DICOM keywords (``Modality``, ...)."""
        keywords = {
            "Modality": "modality",
            "BodyPartExamined": "body_part_examined",
            "StudyDescription": "study_description",
            "SeriesDescription": "series_description",
            "ImageType": "image_type",
            "SliceThickness": "slice_thickness",
            "StudyInstanceUID": "study_uid",
            "SeriesInstanceUID": "series_uid",
        }
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = keywords.get(key, key)
            if name not in cls.__dataclass_fields__:
                raise ConfigError(f"unknown series attribute {key!r}")
            values[name] = value
        image_type = values.get("image_type", ())
        if isinstance(image_type, str):
            image_type = [p for p in image_type.split("\\") if p]
        values["image_type"] = tuple(str(p).upper() for p in image_type)
        if values.get("slice_thickness") not in (None, ""):
            values["slice_thickness"] = float(values["slice_thickness"])
        else:
            values["slice_thickness"] = None
        values["instance_count"] = int(values.get("instance_count", 0) or 0)
        for text in ("modality", "body_part_examined", "study_description", "series_description"):
            values[text] = str(values.get(text, "") or "")
        return cls(**values)

    @classmethod
    def from_row(cls, series: Any) -> SeriesAttributes:
        """From a :class:`node.db.Series` row (its study loaded)."""
        return cls(
            modality=series.modality,
            body_part_examined=series.body_part_examined,
            study_description=series.study.study_description if series.study else "",
            series_description=series.series_description,
            image_type=tuple(p.upper() for p in series.image_type.split("\\") if p),
            slice_thickness=series.slice_thickness,
            instance_count=series.instance_count,
            calling_ae=series.calling_ae,
            study_uid=series.study.study_instance_uid if series.study else "",
            series_uid=series.series_instance_uid,
        )

    @classmethod
    def from_folder(cls, folder: Path, calling_ae: str = "") -> SeriesAttributes:
        """From the DICOM files of one series in ``folder`` (headers only)."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        first = None
        count = 0
        series_uids: set[str] = set()
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                continue
            series_uids.add(str(ds.get("SeriesInstanceUID", "")))
            count += 1
            first = first or ds
        if first is None:
            raise ConfigError(f"no DICOM files found in {folder}")
        if len(series_uids) > 1:
            raise ConfigError(f"{folder} holds {len(series_uids)} series; give one series")
        thickness = slice_thickness_of(first)
        return cls.from_mapping(
            {
                "modality": str(first.get("Modality", "")),
                "body_part_examined": str(first.get("BodyPartExamined", "")),
                "study_description": str(first.get("StudyDescription", "")),
                "series_description": str(first.get("SeriesDescription", "")),
                "image_type": [str(v) for v in (first.get("ImageType") or [])],
                "slice_thickness": thickness,
                "instance_count": count,
                "calling_ae": calling_ae,
                "study_uid": str(first.get("StudyInstanceUID", "")),
                "series_uid": str(first.get("SeriesInstanceUID", "")),
            }
        )


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Range(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def holds(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def text(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


def _joined(values: Sequence[str]) -> str:
    return "\\".join(values)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None


class Match(_Model):
    """Conditions on series attributes; all given must hold."""

    modality: list[str] | None = None
    body_part_examined: list[str] | None = None
    calling_ae: list[str] | None = None
    study_description: str | None = None
    series_description: str | None = None
    image_type: list[str] | None = None
    slice_thickness: Range | None = None
    instance_count: Range | None = None
    all: list[Match] | None = None
    any: list[Match] | None = None
    not_: Match | None = Field(default=None, alias="not")

    _regex: dict[str, re.Pattern[str]] = PrivateAttr(default_factory=dict)

    @field_validator("modality", "body_part_examined", "calling_ae", "image_type", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("modality", "body_part_examined", "calling_ae", "image_type")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not str(x).strip() for x in v)):
            raise ValueError("needs at least one non-empty value")
        return v

    @field_validator("study_description", "series_description")
    @classmethod
    def _regex_ok(cls, v: str | None) -> str | None:
        if v is not None:
            _compile(v)
        return v

    @field_validator("all", "any")
    @classmethod
    def _some(cls, v: list[Match] | None) -> list[Match] | None:
        if v is not None and not v:
            raise ValueError("needs at least one condition block")
        return v

    @model_validator(mode="after")
    def _compile_all(self) -> Self:
        for key in ("study_description", "series_description"):
            pattern = getattr(self, key)
            if pattern is not None:
                self._regex[key] = _compile(pattern)
        return self

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in type(self).model_fields)

    def explain(self, a: SeriesAttributes, prefix: str = "") -> tuple[bool, list[str]]:
        """(matched, one line per condition saying why it held or not)."""
        lines: list[str] = []
        ok = True

        def note(held: bool, text: str) -> None:
            nonlocal ok
            ok = ok and held
            lines.append(f"{prefix}{'ok  ' if held else 'FAIL'} {text}")

        for key, value in (
            ("modality", a.modality),
            ("body_part_examined", a.body_part_examined),
            ("calling_ae", a.calling_ae),
        ):
            wanted = getattr(self, key)
            if wanted is not None:
                held = value.upper() in {w.upper() for w in wanted}
                note(held, f"{key}: {value!r} {'in' if held else 'not in'} {wanted}")
        for key, text in (
            ("study_description", a.study_description),
            ("series_description", a.series_description),
        ):
            if key in self._regex:
                held = self._regex[key].search(text) is not None
                note(
                    held,
                    f"{key}: {text!r} {'matches' if held else 'does not match'} /{self._regex[key].pattern}/",
                )
        if self.image_type is not None:
            missing = [v for v in self.image_type if v.upper() not in a.image_type]
            note(
                not missing,
                f"image_type: {_joined(a.image_type)!r} "
                + (
                    "has " + ", ".join(self.image_type)
                    if not missing
                    else "lacks " + ", ".join(missing)
                ),
            )
        if self.slice_thickness is not None:
            held = self.slice_thickness.holds(a.slice_thickness)
            shown = "missing" if a.slice_thickness is None else f"{a.slice_thickness:g} mm"
            note(
                held,
                f"slice_thickness: {shown} {'within' if held else 'outside'} {self.slice_thickness.text()}",
            )
        if self.instance_count is not None:
            held = self.instance_count.holds(a.instance_count)
            note(
                held,
                f"instance_count: {a.instance_count} {'within' if held else 'outside'} {self.instance_count.text()}",
            )
        if self.all is not None:
            results = [m.explain(a, prefix + "    ") for m in self.all]
            note(
                all(r[0] for r in results), f"all: {sum(r[0] for r in results)}/{len(results)} held"
            )
            for r in results:
                lines.extend(r[1])
        if self.any is not None:
            results = [m.explain(a, prefix + "    ") for m in self.any]
            note(
                any(r[0] for r in results), f"any: {sum(r[0] for r in results)}/{len(results)} held"
            )
            for r in results:
                lines.extend(r[1])
        if self.not_ is not None:
            inner_ok, inner = self.not_.explain(a, prefix + "    ")
            note(not inner_ok, f"not: inner block {'held' if inner_ok else 'did not hold'}")
            lines.extend(inner)
        return ok, lines

    def matches(self, a: SeriesAttributes) -> bool:
        return self.explain(a)[0]


Match.model_rebuild()

ORDER_ATTRIBUTES = ("slice_thickness", "instance_count", "series_description")


class OrderKey(_Model):
    attribute: Literal["slice_thickness", "instance_count", "series_description"]
    direction: Literal["asc", "desc"] = "asc"


class Selection(_Model):
    """Which matching series get a job: ``every`` one, or the ``best_per_study``.

    ``study_quiet_s`` (best_per_study only): the study must also have received no
    instance for this many seconds before its best series is chosen (default 0: as
    soon as no series of the study is still receiving). Raise it when a modality
    sends the series of one study minutes apart.
    """

    policy: Literal["every", "best_per_study"] = "every"
    order_by: list[OrderKey] = Field(default_factory=list)
    study_quiet_s: float = Field(default=0.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _needs_order(self) -> Self:
        if self.policy == "best_per_study" and not self.order_by:
            raise ValueError("order_by: best_per_study needs at least one ordering key")
        if self.policy == "every" and self.study_quiet_s:
            raise ValueError("study_quiet_s: applies only to policy best_per_study")
        return self

    def sort_key(self, a: SeriesAttributes) -> tuple[Any, ...]:
        """Smaller is better; missing values sort last; ties broken by series UID."""
        parts: list[Any] = []
        for key in self.order_by:
            value = getattr(a, key.attribute)
            if value is None:
                parts.append((1, 0))
                continue
            if isinstance(value, str):
                parts.append(
                    (0, value) if key.direction == "asc" else (0, tuple(-ord(c) for c in value))
                )
            else:
                parts.append((0, float(value) if key.direction == "asc" else -float(value)))
        parts.append(a.series_uid)
        return tuple(parts)


class Rule(_Model):
    name: str
    priority: int = Field(default=100, ge=0, le=10_000)
    enabled: bool = True
    description: str = ""
    match: Match = Field(default_factory=Match)
    pipeline: str
    destinations: list[str] = Field(default_factory=list)
    selection: Selection = Field(default_factory=Selection)
    stable_after_s: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a pipeline name (letters, digits, '_', '.', '-') is required")
        return v

    def explain(self, a: SeriesAttributes) -> tuple[bool, list[str]]:
        if not self.enabled:
            return False, ["FAIL rule is disabled"]
        if self.match.is_empty():
            return True, ["ok   no conditions (matches every series)"]
        return self.match.explain(a)

    def definition(self) -> dict[str, Any]:
        """The body kept in RuleRow.definition (without name, priority, enabled)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for key in ("name", "priority", "enabled"):
            data.pop(key, None)
        return data


class DestinationSpec(_Model):
    name: str
    kind: Literal["dimse", "dicomweb"]
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    url: str = ""
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind == "dimse":
            if not _AE.match(self.ae_title):
                raise ValueError("ae_title: 1-16 characters without backslash for a DIMSE peer")
            if not self.host or not 1 <= self.port <= 65535:
                raise ValueError("host and port (1-65535) are required for a DIMSE peer")
        elif not re.match(r"^https?://\S+$", self.url):
            raise ValueError("url: an http(s) URL of the DICOMweb service is required")
        return self


def _error_text(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    where = where.replace("not_", "not")
    msg = str(first["msg"]).removeprefix("Value error, ")
    field_first = re.match(r"^([a-z_]+): ", msg)
    if field_first and where:
        return f"{where}.{msg}"
    return f"{where}: {msg}" if where else msg


def parse_rule(data: Mapping[str, Any]) -> Rule:
    """A validated rule; ConfigError "rule 'NAME': FIELD: REASON" otherwise."""
    name = data.get("name", "?") if isinstance(data, Mapping) else "?"
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"rule {name!r}: {_error_text(exc)}") from exc


def parse_destination(data: Mapping[str, Any]) -> DestinationSpec:
    name = data.get("name", "?") if isinstance(data, Mapping) else "?"
    try:
        return DestinationSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"destination {name!r}: {_error_text(exc)}") from exc


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    destinations: list[DestinationSpec] = field(default_factory=list)

    def ordered(self) -> list[Rule]:
        return sorted(self.rules, key=lambda r: (r.priority, r.name))


def parse_rules_document(doc: Any, source: str = "rules") -> RuleSet:
    """Validate a whole rules document (``rules:`` list, optional ``destinations:``)."""
    if doc is None:
        doc = {}
    if isinstance(doc, list):
        doc = {"rules": doc}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'rules' (and 'destinations')")
    unknown = set(doc) - {"rules", "destinations"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    raw_rules = doc.get("rules") or []
    raw_dests = doc.get("destinations") or []
    if not isinstance(raw_rules, list) or not isinstance(raw_dests, list):
        raise ConfigError(f"{source}: 'rules' and 'destinations' must be lists")
    rules: list[Rule] = []
    for i, item in enumerate(raw_rules):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: rules[{i}] must be a mapping")
        rules.append(parse_rule(item))
    dests = [parse_destination(d if isinstance(d, Mapping) else {}) for d in raw_dests]
    _unique([r.name for r in rules], f"{source}: rule")
    _unique([d.name for d in dests], f"{source}: destination")
    if dests:
        known = {d.name for d in dests}
        for rule in rules:
            for dest in rule.destinations:
                if dest not in known:
                    raise ConfigError(
                        f"rule {rule.name!r}: destinations: {dest!r} is not a declared destination"
                    )
    return RuleSet(rules, dests)


def _unique(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{what} {n!r} is defined twice")
        seen.add(n)


def load_rules_file(path: Path | str) -> RuleSet:
    """Read and validate a rules YAML file; ConfigError naming the file, rule and field."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc}") from exc
    return parse_rules_document(doc, str(path))


# --------------------------------------------------------------------------- database


@dataclass
class SyncReport:
    """What a rules-file load changed (rule names)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def sync_to_database(session: Any, ruleset: RuleSet, actor: str = "system") -> SyncReport:
    """Make the database's file-managed rules equal to the file; upsert its destinations.

    The rules file is the source of truth for the rules it manages
    (``RuleRow.source == file``): each rule in it is created or updated (a rule of
    the same name created through the admin API is taken over), and a file-managed
    rule that is no longer in the file is deleted, with a ``rule.remove`` audit
    event keeping its last definition. Rules created through the admin API are
    never deleted by a load. Destinations are upserted only (a destination may be
    named by admin-created rules and by jobs still waiting to send).
    """
    from sqlalchemy import select

    from node.db import Destination, RuleRow, RuleSource, audit, utcnow

    report = SyncReport()
    for rule in ruleset.rules:
        row = session.scalars(select(RuleRow).where(RuleRow.name == rule.name)).first()
        definition = rule.definition()
        previous = None if row is None else row.source
        if row is None:
            row = RuleRow(name=rule.name)
            session.add(row)
        elif (row.priority, row.enabled, row.definition, row.source) == (
            rule.priority,
            rule.enabled,
            definition,
            RuleSource.FILE,
        ):
            report.unchanged.append(rule.name)
            continue
        row.priority, row.enabled, row.definition = rule.priority, rule.enabled, definition
        row.source = RuleSource.FILE
        row.updated_at = utcnow()
        detail: dict[str, Any] = {"priority": rule.priority, "enabled": rule.enabled}
        if previous == RuleSource.API:
            detail["taken_over_from"] = RuleSource.API.value
        audit(session, actor, "rule.load", f"rule:{rule.name}", **detail)
        (report.created if previous is None else report.updated).append(rule.name)
    in_file = {rule.name for rule in ruleset.rules}
    stale = session.scalars(
        select(RuleRow).where(RuleRow.source == RuleSource.FILE).order_by(RuleRow.name)
    ).all()
    for row in stale:
        if row.name in in_file:
            continue
        audit(
            session,
            actor,
            "rule.remove",
            f"rule:{row.name}",
            reason="no longer in the rules file",
            priority=row.priority,
            enabled=row.enabled,
            definition=row.definition,
        )
        session.delete(row)
        report.removed.append(row.name)
        log.warning("rule %s removed: no longer in the rules file", row.name)
    for dest in ruleset.destinations:
        drow = session.scalars(select(Destination).where(Destination.name == dest.name)).first()
        if drow is None:
            drow = Destination(name=dest.name)
            session.add(drow)
        drow.kind, drow.ae_title, drow.host = dest.kind, dest.ae_title, dest.host
        drow.port, drow.url, drow.enabled = dest.port, dest.url, dest.enabled
        audit(session, actor, "destination.load", f"destination:{dest.name}")
    session.flush()
    return report


def rules_from_rows(rows: Iterable[Any]) -> list[Rule]:
    """Validated rules from RuleRow rows (or dicts with name/priority/enabled/definition).

    A row that no longer validates is skipped and reported by :func:`invalid_rows`.
    """
    rules: list[Rule] = []
    for row in rows:
        try:
            rules.append(rule_from_row(row))
        except ConfigError:
            continue
    return sorted(rules, key=lambda r: (r.priority, r.name))


_PARSED: dict[str, Rule] = {}


def rule_from_row(row: Any) -> Rule:
    """A validated rule from a RuleRow (or dict); parsed once per distinct definition,
    so its regexes are compiled once, not at every sweep."""
    get = row.get if isinstance(row, Mapping) else lambda k: getattr(row, k)
    body = {"name": get("name"), "priority": get("priority"), "enabled": get("enabled")}
    body.update(get("definition") or {})
    key = json.dumps(body, sort_keys=True, default=str)
    rule = _PARSED.get(key)
    if rule is None:
        rule = parse_rule(body)
        if len(_PARSED) > 1000:
            _PARSED.clear()
        _PARSED[key] = rule
    return rule


# --------------------------------------------------------------------------- explanation


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    matched: bool
    lines: tuple[str, ...]


def evaluate(rules: Sequence[Rule], attrs: SeriesAttributes) -> list[RuleVerdict]:
    """Every rule's verdict on ``attrs`` in priority order."""
    out = []
    for rule in sorted(rules, key=lambda r: (r.priority, r.name)):
        ok, lines = rule.explain(attrs)
        out.append(RuleVerdict(rule.name, ok, tuple(lines)))
    return out


def explain_text(rules: Sequence[Rule], attrs: SeriesAttributes) -> str:
    """Human-readable: which rules matched and, condition by condition, why (not)."""
    verdicts = evaluate(rules, attrs)
    by_name = {r.name: r for r in rules}
    out = [
        f"series: modality={attrs.modality!r} body_part={attrs.body_part_examined!r}"
        f" description={attrs.series_description!r} image_type={_joined(attrs.image_type)!r}"
        f" slice_thickness={attrs.slice_thickness} instances={attrs.instance_count}"
        f" calling_ae={attrs.calling_ae!r}"
    ]
    matched = [v.rule for v in verdicts if v.matched]
    out.append("matched: " + (", ".join(matched) if matched else "no rule"))
    for v in verdicts:
        rule = by_name[v.rule]
        extra = f" -> pipeline {rule.pipeline}, destinations {rule.destinations or '[]'}"
        if rule.selection.policy == "best_per_study":
            order = ", ".join(f"{k.attribute} {k.direction}" for k in rule.selection.order_by)
            extra += f" (best series per study by {order})"
        out.append(
            f"rule {v.rule!r} (priority {rule.priority}): {'MATCHED' if v.matched else 'not matched'}{extra if v.matched else ''}"
        )
        out.extend("  " + line for line in v.lines)
    return "\n".join(out)


def dry_run(
    rule_dicts: Sequence[Mapping[str, Any]], attributes: Mapping[str, Any]
) -> dict[str, Any]:
    """For the admin API: which of the given rules match ``attributes``, and why."""
    rules = [rule_from_row(d) for d in rule_dicts]
    attrs = SeriesAttributes.from_mapping(attributes)
    verdicts = evaluate(rules, attrs)
    by_name = {r.name: r for r in rules}
    return {
        "matched": [v.rule for v in verdicts if v.matched],
        "rules": [
            {
                "name": v.rule,
                "matched": v.matched,
                "pipeline": by_name[v.rule].pipeline,
                "destinations": by_name[v.rule].destinations,
                "explanation": list(v.lines),
            }
            for v in verdicts
        ],
    }


def best_of(selection: Selection, candidates: Sequence[SeriesAttributes]) -> SeriesAttributes:
    """The best candidate by the declared ordering (deterministic on ties)."""
    if not candidates:
        raise ValueError("no candidates")
    return min(candidates, key=selection.sort_key)
