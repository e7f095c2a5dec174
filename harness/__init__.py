"""The lab around the product: the federated benchmark and the demo's processes (never imported by it)."""
