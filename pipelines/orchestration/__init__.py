"""Orchestration: the stages shared by ``dvc repro`` and Prefect, the DVC graph, the Prefect flows."""
