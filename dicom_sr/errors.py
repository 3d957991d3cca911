"""Errors raised by ``dicom_sr``.

::

    DicomOutputError (ValueError)
    ├── BuildError          Findings plus sources cannot become a valid object
    └── ReadError           a SEG or SR cannot be read back
        └── UnsupportedObjectError  well-formed, but in a form we refuse

Messages are written for an admin: they name the object, the field and why.
The node translates these into ``node.errors.PipelineError`` where it calls us.
"""

from __future__ import annotations


class DicomOutputError(ValueError):
    """Root of the errors this package raises on purpose."""


class BuildError(DicomOutputError):
    """A DICOM object cannot be built from these findings and source datasets."""


class ReadError(DicomOutputError):
    """A SEG or SR file cannot be read back."""


class UnsupportedObjectError(ReadError):
    """A readable file in a form we refuse (encoding, SOP class, template)."""
