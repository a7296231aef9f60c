"""Experiments: comparisons, studies and diagnoses, each many runs of the engine with their tables.

Each is a Python function first; ``equimodal compare``, ``study`` and ``diagnose`` only parse their
arguments, call it and print its result:

- :func:`compare` (:mod:`~equimodal.experiments.comparison`): balancers x seeds on one dataset, with
  reference rows and paired statistics; returns a :class:`ComparisonResult`.
- :func:`study` (:mod:`~equimodal.experiments.studies`): a documented grid that checks one claim;
  returns a :class:`StudyResult`.
- :func:`diagnose` (:mod:`~equimodal.experiments.diagnosis`): is there modality imbalance, which
  encoder, how much at stake; returns a :class:`DiagnosisResult`.

They share their runs (:mod:`~equimodal.experiments.specs`), how and where the runs are trained
(:mod:`~equimodal.experiments.execution`, :mod:`~equimodal.experiments.executors`: ``execution=
Execution(executor="slurm", ...)``; :mod:`~equimodal.experiments.estimate`) and the comparison's
table (:mod:`~equimodal.experiments.tables`); their files and figures are drawn by
:mod:`equimodal.reporting`. With ``console=None`` they print nothing; pass a ``rich.console.Console``
to see each run start and end. They raise what the commands report: ``RunFolderError`` (a folder in
use or of another config), ``PreflightError`` (a run that cannot start), ``Interrupted`` (SIGINT /
SIGTERM: rerun to resume) and, for ``diagnose``, :class:`RunsFailed`. A dry run
(``Execution(dry_run=True)``), or runs left in flight (``Execution(wait=False)``), returns a
:class:`RunPlan` instead of a result: where the runs stand, and no tables.
"""

from .comparison import ComparisonResult, compare
from .diagnosis import DiagnosisResult, diagnose
from .execution import RunFailure, RunPlan, RunsFailed
from .executors import Execution
from .studies import StudyResult, study

__all__ = [
    "ComparisonResult",
    "DiagnosisResult",
    "Execution",
    "RunFailure",
    "RunPlan",
    "RunsFailed",
    "StudyResult",
    "compare",
    "diagnose",
    "study",
]
