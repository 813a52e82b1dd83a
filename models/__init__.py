"""Model backends: the only code that imports torch, transformers, lagent or model-server clients."""
