"""The miner core: pair store, exact and IVF search, scratch budget. Pure numpy/torch/faiss, no gRPC."""
