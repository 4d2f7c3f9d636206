"""curation: the data engine's library (engine, ops, capabilities, CLI)."""

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations checks online at import
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PACKAGE = Path(__file__).resolve().parent
PROMPTS = PACKAGE / "prompts"  # versioned prompt folders (package data)
PIPELINES = PACKAGE / "pipelines"  # the demo DAG and the real profile (package data)
