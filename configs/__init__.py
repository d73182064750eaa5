"""Experiment configs for ``python -m jvit.main --config configs/<exp>.py`` (run from the repo root)."""
