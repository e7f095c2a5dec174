"""Delivery of results: destinations, the outbox, the C-STORE sender and the sending loop."""
