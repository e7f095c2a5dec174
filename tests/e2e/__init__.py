"""Whole flows with real servers: Orthanc, the edge node process, the hub."""
