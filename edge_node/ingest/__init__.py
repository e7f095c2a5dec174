"""Ingest: the DICOM listener, Part 10 streams, the durable spool, accepted SOP classes, socket options."""
