"""curation: the data engine's library (stages, runner, CLI)."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations checks online at import
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
