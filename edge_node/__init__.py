"""fedclinic edge node: DICOM in from the PACS, ONNX inference, DICOM results back; no torch."""

__version__ = "0.1.0"
