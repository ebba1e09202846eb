"""The gRPC service around the core: server, validation, namespaces, durability (Redis log, snapshots), metrics, CLI."""
