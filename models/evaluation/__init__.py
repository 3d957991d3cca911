"""Evaluation harness: the clinical study's outcome measures on a site's own data.

Public surface::

    load_set(folder, reference=...)   -> EvaluationSet     (dataset)
    evaluate(reference, results, Options()) -> dict         (runner)
    Threshold.parse("dice.liver>=0.9"), check_thresholds     (runner)
    write_outputs(result, reference, results, out_dir)       (render: JSON + HTML)

Metric modules: ``classification`` (diagnosis), ``segmentation`` (overlap and
surface), ``detection`` (lesion matching, FROC), ``text`` (report). Conventions
for edge cases are in each module's docstring and in ``docs/evaluation.md``.
"""

from models.evaluation.dataset import CaseMasks, DatasetError, EvaluationSet, load_set
from models.evaluation.render import write_outputs
from models.evaluation.runner import Options, Threshold, ThresholdError, check_thresholds, evaluate

__all__ = [
    "CaseMasks",
    "DatasetError",
    "EvaluationSet",
    "Options",
    "Threshold",
    "ThresholdError",
    "check_thresholds",
    "evaluate",
    "load_set",
    "write_outputs",
]
