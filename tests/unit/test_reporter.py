"""The live-curve reporter of an untracked run does nothing, without needing mlflow at all (the bare
GPU box has none)."""
from __future__ import annotations

import sys

from tunelab.tracking import Reporter


def test_an_untracked_reporter_never_imports_mlflow(monkeypatch):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    reporter = Reporter(None)
    reporter.log_metrics({"train.loss": 1.0}, 1)
    reporter.set_tags({"tunelab.resumed_from_step": "3"})
