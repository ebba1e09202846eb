"""The hard-pair library any PyTorch loop uses (re-exported by `helip`): session, sampler, pusher, datasets, loss."""
