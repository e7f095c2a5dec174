"""The demo's harness: an Orthanc PACS per clinic, clinic node processes, and the `demo` command."""
