"""Tests of the edge node (no torch, hub or export: they also run in an edge-only environment)."""
