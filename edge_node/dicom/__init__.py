"""DICOM networking of the edge node: the listener that receives studies, and the sender of results."""
