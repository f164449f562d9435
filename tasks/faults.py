"""Named points where the fault tests (``tests/stack/test_faults.py``) kill the worker.

``CNS_FAULT_AT=<point>`` in a worker's environment SIGKILLs that process when it reaches the
point, as the kernel or an operator would (no cleanup, no ``finally``). Without the variable, or
with another point named, :func:`fault_point` does nothing. The points, in the order a learn
reaches them: ``fetch`` (dataset downloaded and validated into a temporary folder), ``score``
(neurons scored and selected), ``commit`` (new lineage and concept files in ``data/model``),
``mlflow-log`` (metrics logged, artifacts not), ``dvc-add-half`` (the model ``dvc add``-ed, the
dataset not), ``dvc-add`` (``dvc add`` done, nothing pushed), ``dvc-push-half`` (the model's objects
pushed, the dataset's not), ``dvc-push`` (pushed, not committed), ``publish`` (tagged; in a lineage
clone the bundle not yet written), ``registry`` (tagged and published, not registered).
"""

from __future__ import annotations

import os
import signal

FAULT_VARIABLE = "CNS_FAULT_AT"


def fault_point(name: str) -> None:
    """SIGKILL this process if ``CNS_FAULT_AT`` names this point; otherwise nothing."""
    if os.environ.get(FAULT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
