"""Tests of edge_node.delivery."""
