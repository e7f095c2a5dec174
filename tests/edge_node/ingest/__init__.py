"""Tests of edge_node.ingest."""
