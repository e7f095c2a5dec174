"""The hub-edge contract: manifest, bundle verification, signatures, tensor encoding, errors."""
