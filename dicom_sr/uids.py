"""Deterministic UIDs for the node's output objects.

A UID depends only on the source series, the pipeline version and the object
kind (plus optional extra parts such as a lesion number), so re-running the same
pipeline version on the same series replaces its results in the PACS instead of
duplicating them; a new pipeline version yields new UIDs.
"""

from __future__ import annotations

import hashlib

# The project's UID root (as in models.series_writer); outputs live under ".2.".
OUTPUT_UID_ROOT = "1.2.826.0.1.3680043.10.1451.2."

KINDS = ("seg", "sr", "pdf", "ko", "sc")


def output_uid(source_series_uid: str, pipeline_version: str, kind: str, *extra: str) -> str:
    """A UID from (source series UID, pipeline version, object kind, extra parts).

    The digest (SHA-256, decimal) is cut so the UID stays within 64 characters and
    never has a leading zero in its last component.
    """
    if not source_series_uid or not pipeline_version or not kind:
        raise ValueError("output_uid needs a source series UID, a pipeline version and a kind")
    text = "\x1f".join((source_series_uid, pipeline_version, kind, *extra))
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    room = 64 - len(OUTPUT_UID_ROOT)
    number = str(digest)[:room].lstrip("0") or "1"
    return OUTPUT_UID_ROOT + number
