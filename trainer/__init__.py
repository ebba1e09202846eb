"""helip's training side, imported as `helip.trainer`: pairs/ (the hard-pair library any loop uses, re-exported by
`helip`), tools/ (evaluation, inspector, synthetic data, the CLIP model) and app/ (`helip-train`). Each layer
imports only the ones before it."""
