"""Evaluation: metrics, scoring a model on labelled pairs, the gate, reports, assessment, calibration."""
