"""helip miner: a gRPC service that mines hard pairs from a continually updated index of pair embeddings."""
