"""One settings object, validated at start and passed in (never a module singleton).

Loaded from a YAML file (``hpb-node --config FILE``) with ``HPB_*`` environment
overrides for the few values deployments set per machine. Every field has an
embedded default that runs the node on one machine with SQLite.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import ConfigError

DEMO_SECRET = "change-me-demo-only"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestSettings(_Section):
    ae_title: str = "HPBNODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list)  # empty: any AE
    max_associations: int = Field(default=8, ge=1)
    max_pdu: int = Field(default=131072, ge=0)
    max_instance_mb: int = Field(default=2048, ge=1)  # larger instances: Out of Resources

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not 1 <= len(v) <= 16 or "\\" in v:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return v


class SpoolSettings(_Section):
    root: Path = Path("var/spool")
    min_free_mb: int = Field(default=512, ge=0)
    retention_hours: float = Field(default=72.0, ge=0)
    # fsync each file and its directory before the row commits (power-loss safe);
    # false only for benchmarks and throw-away nodes
    fsync: bool = True


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/hpb-node.db"


class SchedulerSettings(_Section):
    stable_after_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    late_instances: str = "reopen"  # "reopen" the series or start a "new_job"

    @field_validator("late_instances")
    @classmethod
    def _late(cls, v: str) -> str:
        if v not in ("reopen", "new_job"):
            raise ValueError("late_instances must be 'reopen' or 'new_job'")
        return v


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8042 + 1000, ge=0, le=65535)
    admin_token: str = DEMO_SECRET
    # STOW-RS only (role ingest, node.auth): the token a PACS routing by STOW-RS sends; "" = none
    ingest_token: str = ""


class WorkerSettings(_Section):
    count: int = Field(default=1, ge=0)
    lease_s: float = Field(default=120.0, gt=0)
    heartbeat_s: float = Field(default=15.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    backoff_s: float = Field(default=10.0, ge=0)


class ModelSettings(_Section):
    bundle: Path | None = None  # None: the demo bundle shipped in models/
    device: str = "cpu"
    # Only a bundle you wrote yourself may be trusted: its configs then go through
    # MONAI's ConfigParser ($ expressions, @ references). Untrusted: plain JSON only.
    trusted_bundle: bool = False


class ExportSettings(_Section):
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=5.0, ge=0)
    not_for_clinical_use: bool = True


class ClinicalSettings(_Section):
    """Clinical data sources (FHIR, HL7 MLLP, file import) and study linking."""

    fhir_base_url: str | None = None  # None: no FHIR look-ups
    fhir_timeout_s: float = Field(default=10.0, gt=0)
    # DICOM IssuerOfPatientID -> FHIR Patient.identifier system ("" = no issuer)
    fhir_identifier_systems: dict[str, str] = Field(default_factory=dict)
    mllp_host: str = "127.0.0.1"
    mllp_port: int = Field(default=2575, ge=0, le=65535)
    timezone: str = "UTC"  # for HL7 / CSV times without a UTC offset
    days_before: float = Field(default=30.0, gt=0)  # lab window before the study
    hours_after: float = Field(default=24.0, ge=0)  # ... and after it
    allow_missing_issuer: bool = False

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Berlin)") from None
        return v


class Settings(_Section):
    demo: bool = True
    rules_file: Path | None = None
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    clinical: ClinicalSettings = Field(default_factory=ClinicalSettings)

    def check_secrets(self) -> None:
        """Refuse the demo admin token outside demo mode; an ingest token that is another secret."""
        if not self.demo and self.http.admin_token == DEMO_SECRET:
            raise ConfigError("http.admin_token: the demo secret may only be used with demo: true")
        ingest = self.http.ingest_token
        if ingest and ingest in (self.http.admin_token, DEMO_SECRET):
            raise ConfigError("http.ingest_token: must differ from admin_token and the demo secret")


_ENV = {
    "HPB_DATABASE_URL": ("database", "url"),
    "HPB_SPOOL_ROOT": ("spool", "root"),
    "HPB_ADMIN_TOKEN": ("http", "admin_token"),
    "HPB_INGEST_TOKEN": ("http", "ingest_token"),
}


def load_settings(path: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (YAML) and ``HPB_*`` variables; raise ConfigError naming the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"settings file {path} must hold a mapping at top level")
        data = loaded or {}
    environ = os.environ if env is None else env
    for var, (section, key) in _ENV.items():
        if var in environ:
            data.setdefault(section, {})[key] = environ[var]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"settings: {where}: {first['msg']}") from exc
    settings.check_secrets()
    return settings
