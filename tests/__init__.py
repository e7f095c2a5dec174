"""fedclinic test suite."""
