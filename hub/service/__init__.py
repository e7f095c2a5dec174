"""The hub service's shell: settings, data directory, TLS, enrollment, publications."""
