"""The end-to-end demo and its local clinic harness (an Orthanc PACS and an edge node per clinic)."""
