"""fedclinic export: torch student -> parity-checked ONNX -> signed model bundle."""
