"""compose.yaml, Dockerfile and the files they wire together, checked without Docker.

No Docker engine runs on the test machines, so the deployment is checked as far
as files allow: compose.yaml is parsed by ``compose-spec`` (Python bindings of
the Rust compose_spec crate, a strict Compose Specification parser that refuses
unknown keys), then the deployment policy is asserted on the parsed document:
health checks everywhere, ``depends_on`` waiting for ``service_healthy``, named
volumes declared and used, images pinned, secrets required rather than
defaulted, ports on loopback. The node's inline settings and rules are loaded
by the node's own validators, and the names that must agree across files (AE
titles, ports, Orthanc users, Dockerfile targets and copied paths) are compared.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from node.errors import ConfigError
from node.rules import parse_rules_document
from node.settings import DEMO_SECRET, load_settings
from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "AUTH")
REQUIRED_VAR = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = PyCompose.from_yaml(COMPOSE.read_text()).to_dict()
    return parsed


@pytest.fixture(scope="module")
def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its lines."""
    stages: dict[str, list[str]] = {}
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"^FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m[2]
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_parser_is_strict() -> None:
    broken = COMPOSE.read_text().replace("    restart: unless-stopped", "    restartt: no", 1)
    with pytest.raises(ValueError, match="restartt"):
        PyCompose.from_yaml(broken)


def test_services_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "orthanc", "node", "viewer"}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name}: no healthcheck"
        assert not hc.get("disable"), name
        for dep, spec in svc.get("depends_on", {}).items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}: {spec}"
            assert services[dep].get("healthcheck"), f"{name} waits for {dep} without health"
    assert set(services["node"]["depends_on"]) == {"postgres", "orthanc"}
    assert set(services["viewer"]["depends_on"]) == {"orthanc"}


def test_volumes_declared_and_used(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind source {source} missing"
            else:
                used.add(source)
    assert used == declared
    # state lives in volumes: the database, Orthanc's storage and the node's spool
    mounts = {n: " ".join(map(str, s.get("volumes", []))) for n, s in compose["services"].items()}
    assert "pgdata:/var/lib/postgresql/data" in mounts["postgres"]
    assert "orthanc-db:/var/lib/orthanc/db" in mounts["orthanc"]
    assert "spool:/var/lib/hpb-node/spool" in mounts["node"]


def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return (
        bool(name) and "@sha256:" not in tag and tag != "latest" and any(c.isdigit() for c in tag)
    )


def test_images_pinned(compose: dict[str, Any], dockerfile_stages: dict[str, list[str]]) -> None:
    for name, svc in compose["services"].items():
        assert pinned(svc["image"]) or "@sha256:" in svc["image"], f"{name}: {svc['image']}"
        if "build" in svc:
            assert svc["build"]["target"] in dockerfile_stages, name
    for stage, lines in dockerfile_stages.items():
        base = lines[0].split()[1]
        assert base in dockerfile_stages or pinned(base), f"stage {stage}: {base} not pinned"


def test_dockerfile_copies_existing_paths_and_has_healthchecks(
    dockerfile_stages: dict[str, list[str]],
) -> None:
    for stage, lines in dockerfile_stages.items():
        for line in lines:
            if line.startswith("COPY") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{stage}: COPY {src} missing"
        if not stage.endswith("-build"):
            assert any(line.startswith("HEALTHCHECK") for line in lines), stage
            assert any(line.startswith("USER") for line in lines) or stage == "viewer", stage
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "**/node_modules" in ignored and ".env" in ignored


def test_secrets_are_required_never_defaulted(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"\$\{[A-Z0-9_]+:-", text), "a variable with a default value"
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in SECRET_WORDS) or ("://" in str(value) and "@" in str(value)):
                assert REQUIRED_VAR.search(str(value)), f"{name}.{key} must be ${{VAR:?...}}"
    # the node never runs in demo mode here, so the demo token is refused at start
    settings_text = compose["configs"]["node-settings"]["content"]
    assert yaml.safe_load(settings_text)["demo"] is False
    assert DEMO_SECRET not in text


def test_ports_only_on_loopback(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_node_settings_and_rules_validate_and_agree_with_orthanc(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(compose["configs"]["node-settings"]["content"])
    env = {
        "HPB_DATABASE_URL": "postgresql+psycopg://hpb:x@postgres:5432/hpb",
        "HPB_ADMIN_TOKEN": "a-site-secret",
        "HPB_SPOOL_ROOT": "/var/lib/hpb-node/spool",
    }
    settings = load_settings(cfg, env=env)
    with pytest.raises(ConfigError, match="demo secret"):
        load_settings(cfg, env={**env, "HPB_ADMIN_TOKEN": DEMO_SECRET})
    node_env = compose["services"]["node"]["environment"]
    assert set(env) <= set(node_env)
    rules = parse_rules_document(yaml.safe_load(compose["configs"]["node-rules"]["content"]))
    assert {r.name for r in rules.rules} == {"liver-ct", "liver-mr"}

    orthanc = json.loads((ROOT / "orthanc" / "orthanc.json").read_text())
    node_modality = orthanc["DicomModalities"]["hpbnode"]
    assert node_modality["AET"] == settings.ingest.ae_title
    assert (node_modality["Host"], node_modality["Port"]) == ("node", settings.ingest.port)
    assert orthanc["DicomAet"] in settings.ingest.allowed_calling_aes
    pacs = next(d for d in rules.destinations if d.name == "pacs")
    assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc["DicomAet"], "orthanc", 4242)
    assert orthanc["HpbRouter"]["NodeAeTitles"] == [settings.ingest.ae_title]
    stow = orthanc["DicomWeb"]["Servers"]["hpbnode"]["Url"]
    assert stow == f"http://node:{settings.http.port}/dicom-web/"
    # every ${VAR} in Orthanc's configuration is provided (and required) by compose
    wanted = set(re.findall(r"\$\{([A-Z0-9_]+)\}", json.dumps(orthanc)))
    orthanc_env = compose["services"]["orthanc"]["environment"]
    assert wanted and wanted <= set(orthanc_env)
    assert set(orthanc["RegisteredUsers"]) == {"admin", "hpbnode", "viewer"}


def test_viewer_uses_orthanc_dicomweb_on_its_own_origin() -> None:
    template = (ROOT / "orthanc" / "viewer" / "nginx.conf.template").read_text()
    assert "location /dicom-web/" in template
    assert "proxy_pass http://orthanc:8042/dicom-web/;" in template
    assert "limit_except GET HEAD { deny all; }" in template
    config = (ROOT / "tests" / "ohif" / "app-config.js").read_text()
    assert "window.location.origin + '/dicom-web'" in config
    lock = json.loads((ROOT / "tests" / "ohif" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@ohif/app"]["version"] == "3.12.10"
