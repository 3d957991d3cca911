"""hpb-node router: an Orthanc Python plugin that sends stable series to the node.

Runs inside Orthanc on Debian's system ``python3`` (the orthanc-python
plugin); it imports ``orthanc`` and the standard library only.

When Orthanc reports a series as stable (``ChangeType.STABLE_SERIES``), the
plugin decides whether the node should see it:

1. never the node's own results (no loops): series whose modality or SOP class
   marks them as an output (SEG, SR, PDF, KO, SC, PR), whose Manufacturer or
   SeriesDescription match the node's output markers, whose instances were sent
   by one of the node's AE titles (Orthanc's ``RemoteAET`` metadata or the
   file meta ``SourceApplicationEntityTitle``), or which carry the node's
   private creator;
2. then the site filters: Modality, BodyPartExamined (lists, case
   insensitive, empty means any), SeriesDescription / StudyDescription regular
   expressions (and an exclusion regex), a minimum number of instances.

A series that passes is sent with an Orthanc job: C-STORE through
``/modalities/{Target}/store`` (``"Method": "dimse"``) or STOW-RS through
``/dicom-web/servers/{Target}/stow`` (``"Method": "stow"``). What was routed
is written to the series metadata ``HpbRouted`` (declare it in
``UserMetadata``) and both routed and skipped decisions are listed, newest
last, by ``GET /hpb-router/routed``; ``GET /hpb-router/config`` shows the
active configuration. The configuration is the ``HpbRouter`` section of the
Orthanc configuration (see ``orthanc/orthanc.json``).

The change callback only queues the series; a worker thread does the REST
calls, so Orthanc's change thread is never held up.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections import deque
from typing import Any

import orthanc

SECTION = "HpbRouter"
METADATA = "HpbRouted"

# SOP classes the node writes (never routed back to it).
OUTPUT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit SC",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte SC",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word SC",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color SC",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
}
OUTPUT_MODALITIES = {"SEG", "SR", "DOC", "KO", "PR", "OT"}

DEFAULTS: dict[str, Any] = {
    "Enabled": True,
    "Target": "hpbnode",  # a DicomModalities name (dimse) or DicomWeb.Servers name (stow)
    "Method": "dimse",  # "dimse" or "stow"
    "Modalities": ["CT", "MR"],
    "BodyPartsExamined": [],  # e.g. ["ABDOMEN", "LIVER", "PANCREAS"]; empty: any
    "SeriesDescriptionRegex": "",  # must match (re.search, case-insensitive) when set
    "StudyDescriptionRegex": "",
    "ExcludeSeriesDescriptionRegex": "",
    "MinInstances": 1,
    "NodeAeTitles": ["HPBNODE"],  # AE titles the node sends its results from
    "OutputManufacturers": ["hpb-node"],
    "OutputSeriesDescriptionRegex": r"^AI |NOT FOR CLINICAL USE",
    "NodePrivateCreator": "HPB-NODE",
    "MaxRecords": 1000,
}


class RouterConfigError(ValueError):
    """The HpbRouter section is invalid; the message names the key."""


def _regex(conf: dict[str, Any], key: str) -> re.Pattern[str] | None:
    value = conf[key]
    if not isinstance(value, str):
        raise RouterConfigError(f"{SECTION}.{key} must be a string")
    if not value:
        return None
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise RouterConfigError(f"{SECTION}.{key}: invalid regular expression: {exc}") from exc


def _upper_list(conf: dict[str, Any], key: str) -> frozenset[str]:
    value = conf[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RouterConfigError(f"{SECTION}.{key} must be a list of strings")
    return frozenset(v.strip().upper() for v in value)


class RouterConfig:
    """The validated ``HpbRouter`` section."""

    def __init__(self, raw: dict[str, Any] | None) -> None:
        raw = raw or {}
        unknown = sorted(set(raw) - set(DEFAULTS))
        if unknown:
            raise RouterConfigError(f"{SECTION}: unknown key(s) {', '.join(unknown)}")
        conf = dict(DEFAULTS)
        conf.update(raw)
        self.raw = conf
        self.enabled = bool(conf["Enabled"])
        self.target = str(conf["Target"])
        if not self.target:
            raise RouterConfigError(f"{SECTION}.Target must name a modality or DICOMweb server")
        self.method = str(conf["Method"]).lower()
        if self.method not in ("dimse", "stow"):
            raise RouterConfigError(f"{SECTION}.Method must be 'dimse' or 'stow'")
        self.modalities = _upper_list(conf, "Modalities")
        self.body_parts = _upper_list(conf, "BodyPartsExamined")
        self.node_aes = _upper_list(conf, "NodeAeTitles")
        self.output_manufacturers = _upper_list(conf, "OutputManufacturers")
        self.series_re = _regex(conf, "SeriesDescriptionRegex")
        self.study_re = _regex(conf, "StudyDescriptionRegex")
        self.exclude_re = _regex(conf, "ExcludeSeriesDescriptionRegex")
        self.output_desc_re = _regex(conf, "OutputSeriesDescriptionRegex")
        self.private_creator = str(conf["NodePrivateCreator"]).strip().upper()
        try:
            self.min_instances = int(conf["MinInstances"])
            self.max_records = int(conf["MaxRecords"])
        except (TypeError, ValueError) as exc:
            raise RouterConfigError(f"{SECTION}.MinInstances/MaxRecords must be integers") from exc


def node_output_reason(
    series_tags: dict[str, str],
    instance_tags: dict[str, Any],
    instance_meta: dict[str, str],
    header: dict[str, str],
    conf: RouterConfig,
) -> str:
    """Why this series is one of the node's own results ("" when it is not)."""
    modality = series_tags.get("Modality", "").strip().upper()
    if modality in OUTPUT_MODALITIES:
        return f"node output: modality {modality}"
    sop_class = instance_meta.get("SopClassUid", "")
    if sop_class in OUTPUT_SOP_CLASSES:
        return f"node output: SOP class {OUTPUT_SOP_CLASSES[sop_class]}"
    manufacturer = series_tags.get("Manufacturer", "").strip().upper()
    if manufacturer and manufacturer in conf.output_manufacturers:
        return f"node output: manufacturer {manufacturer}"
    description = series_tags.get("SeriesDescription", "")
    if conf.output_desc_re is not None and conf.output_desc_re.search(description):
        return "node output: series description marks a node result"
    remote = instance_meta.get("RemoteAET", "").strip().upper()
    if remote and remote in conf.node_aes:
        return f"node output: sent by the node's AE {remote}"
    source = header.get("SourceApplicationEntityTitle", "").strip().upper()
    if source and source in conf.node_aes:
        return f"node output: source AE {source}"
    if conf.private_creator:
        for key, element in instance_tags.items():
            group, _, elem = key.partition(",")
            try:
                private_creator_slot = int(group, 16) % 2 == 1 and 0x10 <= int(elem, 16) <= 0xFF
            except ValueError:
                continue
            if private_creator_slot and isinstance(element, dict):
                value = str(element.get("Value", "")).strip().upper()
                if value == conf.private_creator:
                    return "node output: node private creator present"
    return ""


def filter_reason(
    series_tags: dict[str, str], study_tags: dict[str, str], count: int, conf: RouterConfig
) -> str:
    """Why the site filters refuse this series ("" when they accept it)."""
    modality = series_tags.get("Modality", "").strip().upper()
    if conf.modalities and modality not in conf.modalities:
        return f"filter: modality {modality or '(none)'} not in {sorted(conf.modalities)}"
    body_part = series_tags.get("BodyPartExamined", "").strip().upper()
    if conf.body_parts and body_part not in conf.body_parts:
        return f"filter: body part {body_part or '(none)'} not in {sorted(conf.body_parts)}"
    description = series_tags.get("SeriesDescription", "")
    if conf.series_re is not None and not conf.series_re.search(description):
        return "filter: series description does not match SeriesDescriptionRegex"
    if conf.exclude_re is not None and conf.exclude_re.search(description):
        return "filter: series description matches ExcludeSeriesDescriptionRegex"
    if conf.study_re is not None and not conf.study_re.search(
        study_tags.get("StudyDescription", "")
    ):
        return "filter: study description does not match StudyDescriptionRegex"
    if count < conf.min_instances:
        return f"filter: {count} instance(s), fewer than MinInstances={conf.min_instances}"
    return ""


def _get_json(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


class Router:
    """Queue of stable series and the worker thread that routes them."""

    def __init__(self, conf: RouterConfig) -> None:
        self.conf = conf
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.routed: deque[dict[str, Any]] = deque(maxlen=conf.max_records)
        self.skipped: deque[dict[str, Any]] = deque(maxlen=conf.max_records)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="hpb-router", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            series_id = self.queue.get()
            if series_id is None:
                return
            try:
                self.handle(series_id)
            except Exception as exc:  # the plugin must survive any single series
                orthanc.LogError(f"hpb-router: series {series_id}: {exc!r}")
                self._record(self.skipped, series_id, "", f"error: {exc}")

    def _record(self, where: deque[dict[str, Any]], series_id: str, uid: str, why: str) -> None:
        entry = {"series": series_id, "series_uid": uid, "reason": why, "at": time.time()}
        with self.lock:
            where.append(entry)

    def handle(self, series_id: str) -> None:
        conf = self.conf
        series = _get_json(f"/series/{series_id}")
        tags: dict[str, str] = series.get("MainDicomTags", {})
        uid = tags.get("SeriesInstanceUID", "")
        instances: list[str] = series.get("Instances", [])
        if not instances:
            self._record(self.skipped, series_id, uid, "series has no instances")
            return
        first = instances[0]
        meta = _get_json(f"/instances/{first}/metadata?expand")
        header = _get_json(f"/instances/{first}/header?simplify")
        inst_tags = _get_json(f"/instances/{first}/tags")
        why = node_output_reason(tags, inst_tags, meta, header, conf)
        if not why:
            study = _get_json(f"/studies/{series['ParentStudy']}")
            why = filter_reason(tags, study.get("MainDicomTags", {}), len(instances), conf)
        if not why:
            previous = _get_json(f"/series/{series_id}/metadata?expand").get(METADATA)
            if previous:
                try:
                    done = json.loads(previous)
                except ValueError:
                    done = {}
                if done.get("instances") == len(instances):
                    why = "already routed with the same instances"
        if why:
            orthanc.LogInfo(f"hpb-router: not routing series {series_id}: {why}")
            self._record(self.skipped, series_id, uid, why)
            return
        job = self.send(series_id)
        record = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": conf.target,
            "method": conf.method,
            "job": job,
            "instances": len(instances),
        }
        orthanc.RestApiPut(f"/series/{series_id}/metadata/{METADATA}", json.dumps(record))
        orthanc.LogWarning(
            f"hpb-router: routed series {series_id} ({len(instances)} instances) "
            f"to {conf.target} by {conf.method}, job {job}"
        )
        self._record(self.routed, series_id, uid, f"job {job}")

    def send(self, series_id: str) -> str:
        body = json.dumps({"Resources": [series_id], "Synchronous": False})
        if self.conf.method == "dimse":
            uri = f"/modalities/{self.conf.target}/store"
        else:
            uri = f"/dicom-web/servers/{self.conf.target}/stow"
        # AfterPlugins: RestApiPost reaches only Orthanc's core routes, not the
        # DICOMweb plugin's /dicom-web/servers/... ("Unknown resource")
        answer = json.loads(orthanc.RestApiPostAfterPlugins(uri, body))
        return str(answer.get("ID", ""))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"routed": list(self.routed), "skipped": list(self.skipped)}


def _load() -> Router | None:
    config = json.loads(orthanc.GetConfiguration())
    try:
        conf = RouterConfig(config.get(SECTION))
    except RouterConfigError as exc:
        orthanc.LogError(f"hpb-router disabled: {exc}")
        return None
    if METADATA not in config.get("UserMetadata", {}):
        orthanc.LogWarning(
            f'hpb-router: declare "{METADATA}" in UserMetadata to record routed series'
        )
    if not conf.enabled:
        orthanc.LogWarning("hpb-router: disabled by configuration (HpbRouter.Enabled)")
    return Router(conf)


ROUTER = _load()
if ROUTER is not None:
    ROUTER.start()


def on_change(change_type: int, level: int, resource_id: str) -> None:
    if ROUTER is None:
        return
    if change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        ROUTER.stop()
    elif change_type == orthanc.ChangeType.STABLE_SERIES and ROUTER.conf.enabled:
        ROUTER.queue.put(resource_id)


def rest_routed(output: Any, uri: str, **request: Any) -> None:
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    body = ROUTER.snapshot() if ROUTER is not None else {"routed": [], "skipped": []}
    body["enabled"] = ROUTER is not None and ROUTER.conf.enabled
    output.AnswerBuffer(json.dumps(body), "application/json")


def rest_config(output: Any, uri: str, **request: Any) -> None:
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    body = ROUTER.conf.raw if ROUTER is not None else {"error": "router disabled, see the log"}
    output.AnswerBuffer(json.dumps(body), "application/json")


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/hpb-router/routed", rest_routed)
orthanc.RegisterRestCallback("/hpb-router/config", rest_config)
