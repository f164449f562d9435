"""Prefect flows: the readable call graph over ``tasks`` (watch bucket -> personalize -> version)."""
