"""Tests of edge_node.state."""
