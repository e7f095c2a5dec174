"""The node's uplink to the hub: enrollment, a pinned HTTPS transport, bundle and task sync, update outbox."""
