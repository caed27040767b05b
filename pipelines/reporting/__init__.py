"""Reporting: MLflow tracking, the comparison report, plots and overlays."""
