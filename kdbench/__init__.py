"""kdbench: a benchmark harness for knowledge distillation in semantic segmentation."""

import os

__version__ = "0.1.0"

# No phoning home: MLflow telemetry and hub look-ups stay off unless the user turns them on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter
# OpenMP threads that spin while waiting stall small models ~100x when another process shares the
# CPU (measured here); passive waiting costs little when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
