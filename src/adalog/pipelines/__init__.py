"""End-to-end pipelines: evaluation (and, built on it, calibration, export)."""
