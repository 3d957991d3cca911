"""Clinical data for the model: FHIR R4, HL7 v2 over MLLP, CSV/JSON import.

Public surface::

    store       tables (clinical_observations, clinical_notes, hl7_messages),
                LabRecord / NoteRecord, store_batch, ensure_tables
    linking     StudyKey, clinical_context(session, key) -> models.labs.ClinicalContext,
                context_for_study(session, study_row, settings): FHIR fetch + store + link
    hl7v2       parse_oru, Hl7Handler, MllpServer
    fhir        FhirClient
    importer    read_records, import_file

Every failure is a :class:`node.errors.ClinicalDataError` whose message says
which record or request and why.
"""

from node.clinical.linking import StudyKey, clinical_context, context_for_study, study_key
from node.clinical.store import (
    ClinicalNote,
    ClinicalObservation,
    Hl7Message,
    LabRecord,
    NoteRecord,
    ensure_tables,
    store_batch,
)

__all__ = [
    "ClinicalNote",
    "ClinicalObservation",
    "Hl7Message",
    "LabRecord",
    "NoteRecord",
    "StudyKey",
    "clinical_context",
    "context_for_study",
    "ensure_tables",
    "store_batch",
    "study_key",
]
