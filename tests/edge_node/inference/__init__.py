"""Tests of edge_node.inference."""
