"""Sandbox orchestration: lifecycle, records, mounts, validation."""
