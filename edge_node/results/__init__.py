"""Result objects sent back to the PACS: a DICOM Structured Report and a Secondary Capture with the result."""
