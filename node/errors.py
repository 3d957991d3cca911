"""One exception root for the node.

::

    NodeError
    ├── ConfigError        settings, rules, destinations that cannot be used
    ├── IngestError        an instance that is refused (carries the DICOM status)
    ├── SpoolError         the spool cannot store or find a file
    ├── QueueError         job-queue misuse (unknown job, lost lease)
    ├── PipelineError      a stage of a job failed; message is for admins
    ├── ExportError        sending a result to a destination failed
    └── ClinicalDataError  FHIR / HL7 / CSV clinical data unusable

Errors from pynetdicom, httpx, SQLAlchemy and torch are translated into these
where they enter the node.
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Configuration (settings, rule, destination) is invalid; message names the field."""


class IngestError(NodeError):
    """An incoming instance is refused.

    ``status`` is the DICOM status to answer with; ``reason`` is recorded.
    """

    def __init__(self, reason: str, status: int = 0xC000) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SpoolError(NodeError):
    """The spool could not store or read a file."""


class QueueError(NodeError):
    """The job queue was used wrongly (unknown job, lease lost)."""


class PipelineError(NodeError):
    """A pipeline stage failed; the message is written for an admin."""


class ExportError(NodeError):
    """Sending a result object to a destination failed."""


class ClinicalDataError(NodeError):
    """Clinical data (FHIR, HL7, CSV) could not be used."""
