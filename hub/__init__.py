"""fedclinic hub: federated rounds, strategies, teacher/student training, admin CLI."""

__version__ = "0.1.0"
