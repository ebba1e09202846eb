"""Tools around the library: evaluation, the hard-pair inspector, synthetic data, the CLIP model and checkpoints."""
