"""Helpers shared by test packages (built from the real pipeline, never fakes of it)."""
