"""The report as a one-page PDF (reportlab), wrapped as DICOM Encapsulated PDF.

The page holds a header (with the not-for-clinical-use marking when configured),
patient and study identifiers, the findings and impression text, a table of
measured lesions, the diagnoses with probabilities, the clinical inputs used
and missing, and a key-image thumbnail (the largest lesion's key slice with its
outline and axes).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
)
from reportlab.lib.pagesizes import A4
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

from dicom_sr import codes
from dicom_sr.errors import BuildError
from dicom_sr.keyimages import render_key_image
from dicom_sr.options import SERIES_OFFSETS, OutputOptions
from dicom_sr.sources import order_sources
from dicom_sr.uids import output_uid
from models.findings import Findings

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


_MAX_SECTION_LINES = 18


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split()
        line = ""
        for w in words:
            if len(line) + len(w) + 1 > width:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
    return lines


def render_pdf(
    findings: Findings,
    source: Dataset,
    options: OutputOptions,
    thumbnail: npt.NDArray[np.uint8] | None = None,
) -> bytes:
    """The one-page report PDF as bytes."""
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, invariant=1)
    c.setTitle("hpb-node AI report draft")
    width, height = A4
    y = height - 18 * mm
    if options.not_for_clinical_use:
        c.setFillColorRGB(0.75, 0.0, 0.0)
        c.setFont("Helvetica-Bold", 13)
        c.drawString(18 * mm, y, options.marking)
        y -= 7 * mm
        c.setFillColorRGB(0, 0, 0)
    c.setFont("Helvetica-Bold", 15)
    c.drawString(18 * mm, y, "AI report draft: liver, biliary and pancreatic imaging")
    y -= 7 * mm
    c.setFont("Helvetica", 9)
    study = f"{getattr(source, 'StudyDescription', '')} {getattr(source, 'StudyDate', '')}".strip()
    c.drawString(18 * mm, y, f"Patient ID: {getattr(source, 'PatientID', '')}   Study: {study}")
    y -= 5 * mm
    p = findings.provenance
    c.drawString(
        18 * mm, y, f"Algorithm: {p.model_name} {p.model_version}; pipeline {p.pipeline_version}"
    )
    y -= 5 * mm
    series = str(getattr(source, "SeriesDescription", "") or "").strip()
    for line in _wrap(f"Series: {series or '(no description)'}; {p.phase_statement}", 110):
        c.drawString(18 * mm, y, line)
        y -= 4.2 * mm
    y -= 3.8 * mm
    if thumbnail is not None:
        img = Image.fromarray(thumbnail)
        side = 60 * mm
        c.drawImage(
            ImageReader(img), width - 18 * mm - side, y - side, side, side, preserveAspectRatio=True
        )
    text_width = 62 if thumbnail is not None else 100
    for title, section in (("Findings", "findings"), ("Impression", "impression")):
        c.setFont("Helvetica-Bold", 11)
        c.drawString(18 * mm, y, title)
        y -= 5 * mm
        c.setFont("Helvetica", 9)
        lines = _wrap(findings.report_text(section) or "-", text_width)
        if len(lines) > _MAX_SECTION_LINES:  # one page: the SR holds the full text
            lines = [*lines[: _MAX_SECTION_LINES - 1], "... (full text in the DICOM SR)"]
        for line in lines:
            c.drawString(18 * mm, y, line)
            y -= 4.2 * mm
        y -= 3 * mm
    y = min(y, height - 100 * mm)
    c.setFont("Helvetica-Bold", 11)
    c.drawString(18 * mm, y, "Lesions")
    y -= 5 * mm
    c.setFont("Helvetica", 9)
    for les in findings.lesions[:15]:
        site = codes.ORGANS[les.organ].label
        if les.sub_site:
            site += " " + codes.SUB_SITE_LABELS[les.sub_site]
        c.drawString(
            18 * mm,
            y,
            f"{les.number}. {les.kind.value}, {site}: {les.long_axis.length_mm:.1f} x "
            f"{les.short_axis.length_mm:.1f} mm, {les.volume_ml:.1f} ml, slice {les.key_slice + 1}",
        )
        y -= 4.2 * mm
    if len(findings.lesions) > 15:
        c.drawString(18 * mm, y, f"... and {len(findings.lesions) - 15} more (see SR)")
        y -= 4.2 * mm
    y -= 3 * mm
    c.setFont("Helvetica-Bold", 11)
    c.drawString(18 * mm, y, "Diagnosis probabilities")
    y -= 5 * mm
    c.setFont("Helvetica", 9)
    for dx in sorted(findings.diagnoses, key=lambda d: -d.probability):
        c.drawString(18 * mm, y, f"{codes.DISEASES[dx.disease].meaning}: {dx.probability:.0%}")
        y -= 4.2 * mm
    y -= 3 * mm
    c.setFont("Helvetica-Bold", 11)
    c.drawString(18 * mm, y, "Clinical inputs")
    y -= 5 * mm
    c.setFont("Helvetica", 9)
    used = ", ".join(f"{v.name} {v.value} {v.unit}".strip() for v in p.clinical_used) or "none"
    missing = ", ".join(p.clinical_missing) or "none"
    for line in _wrap(f"Used: {used}. Missing: {missing}.", 100):
        c.drawString(18 * mm, y, line)
        y -= 4.2 * mm
    c.setFont("Helvetica-Oblique", 7)
    c.drawString(
        18 * mm,
        12 * mm,
        "Draft generated by software; every statement is linked to a measured finding in the "
        "DICOM SR. Verify against the images.",
    )
    c.showPage()
    c.save()
    return buf.getvalue()


def build_pdf(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    *,
    options: OutputOptions | None = None,
    sr: Dataset | None = None,
    frame_numbers: Sequence[int | None] | None = None,
) -> Dataset:
    """The Encapsulated PDF instance (new series) for these findings."""
    opts = options or OutputOptions(pipeline_version=findings.provenance.pipeline_version)
    series = order_sources(findings, source_datasets, frame_numbers)
    src = series.first
    lesions = [les for les in findings.lesions if les.mask.any()]
    thumb = None
    if lesions:
        biggest = max(lesions, key=lambda les: les.long_axis.length_mm)
        thumb = render_key_image(biggest, series)
    pdf = render_pdf(findings, src, opts, thumb)
    p = findings.provenance
    sop_uid = UID(output_uid(p.input_series_uid, opts.pipeline_version, "pdf", "1"))
    now = p.created_at or datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = getattr(src, "SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    for kw in _PATIENT_STUDY:
        if kw in src:
            setattr(ds, kw, src[kw].value)
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        if kw not in ds:
            setattr(ds, kw, "")
    if "StudyInstanceUID" not in ds:
        raise BuildError("source has no StudyInstanceUID")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = output_uid(p.input_series_uid, opts.pipeline_version, "pdf")
    ds.SeriesNumber = opts.series_number_base + SERIES_OFFSETS["pdf"]
    ds.SeriesDescription = opts.describe("AI report draft (PDF)")
    ds.Manufacturer = opts.manufacturer
    if opts.institution_name:
        ds.InstitutionName = opts.institution_name
    ds.ConversionType = "SYN"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    title = "AI report draft"
    if opts.not_for_clinical_use:
        title += f" [{opts.marking}]"
    ds.DocumentTitle = title[:64]
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic imaging study"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if sr is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sr.SOPClassUID
        ref.ReferencedSOPInstanceUID = sr.SOPInstanceUID
        ds.SourceInstanceSequence = DicomSequence([ref])
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    return ds
