"""`helip-train`: the DeepSpeed application built on the hard-pair library."""
