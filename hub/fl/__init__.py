"""Federated strategies as pure objects (numpy only): configure a round, aggregate results and failures."""
