"""What client and server agree on: tensors on the wire, namespace names, the shard rule, transport security."""
