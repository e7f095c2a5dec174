"""Tests of edge_node.analysis."""
