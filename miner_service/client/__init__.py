"""Clients of the miner: one miner, a leader with read replicas, or shards, all answering as one miner."""
