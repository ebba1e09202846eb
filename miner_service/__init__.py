"""helip's miner, imported as `helip.miner_service`: core/ (pair store, search, IVF, scratch budget), wire/ (tensors,
names, shard rule, transport security), service/ (gRPC server, validation, namespaces, durability, metrics, CLI) and
client/ (single, replicated and sharded clients). Each layer imports only the ones before it; client never imports
service."""
