"""Torch training on the hub: supervised training, checkpoints, federated simulation."""
