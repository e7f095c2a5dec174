"""The benchmark over the wire: `bench fl` methods run by a real hub and real edge nodes, beside the sim."""
