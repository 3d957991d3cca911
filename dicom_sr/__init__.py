"""Everything that turns ``Findings`` plus source datasets into DICOM objects.

Public API::

    build_all(findings, source_datasets, options) -> list[(kind, Dataset)]
    build_seg / build_sr / build_pdf / build_key_objects / build_secondary_captures
    read_seg / read_sr / read_any  (readers for ours and other tools' objects)
    readback(read_sr(...))         (findings-like data from an SR)
    output_uid                   (deterministic UIDs)
    OutputOptions                (one frozen options object)

Errors: ``DicomOutputError`` > ``BuildError`` | ``ReadError`` > ``UnsupportedObjectError``.
"""

from __future__ import annotations

from dicom_sr.build import build_all
from dicom_sr.errors import BuildError, DicomOutputError, ReadError, UnsupportedObjectError
from dicom_sr.keyimages import build_key_objects, build_secondary_captures
from dicom_sr.options import OutputOptions
from dicom_sr.readback import Readback, readback
from dicom_sr.readers import read_any, read_seg, read_sr
from dicom_sr.report_pdf import build_pdf
from dicom_sr.seg import build_seg
from dicom_sr.sr import build_sr
from dicom_sr.uids import output_uid

__all__ = [
    "BuildError",
    "DicomOutputError",
    "OutputOptions",
    "ReadError",
    "Readback",
    "UnsupportedObjectError",
    "build_all",
    "build_key_objects",
    "build_pdf",
    "build_secondary_captures",
    "build_seg",
    "build_sr",
    "output_uid",
    "read_any",
    "read_seg",
    "read_sr",
    "readback",
]
