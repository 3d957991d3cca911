"""Synthetic abdominal CT/MR cases with exact organ, lesion and disease truth.

Everything produced here is synthetic: numbers computed on it must be quoted as
synthetic. See ``docs/synthetic-data.md`` for the anatomy, the label table and
the appearance model, and ``docs/dataset-manifest.md`` for the dataset format.
"""

from models.synthetic.diseases import sample_diseases
from models.synthetic.generator import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    LARGE_SHAPE,
    LARGE_SPACING,
    SyntheticCase,
    generate_case,
)
from models.synthetic.labels import LABEL_OF_ORGAN, ORGAN_LABELS
from models.synthetic.writer import (
    MANIFEST_NAME,
    read_manifest,
    write_case,
    write_dataset,
)

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "LABEL_OF_ORGAN",
    "LARGE_SHAPE",
    "LARGE_SPACING",
    "MANIFEST_NAME",
    "ORGAN_LABELS",
    "SyntheticCase",
    "generate_case",
    "read_manifest",
    "sample_diseases",
    "write_case",
    "write_dataset",
]
