"""Training-framework adapters: plain PyTorch (``prunekit.prepare_pruning``), Hugging Face ``Trainer``
(:mod:`prunekit.integrations.transformers`) and Lightning (:mod:`prunekit.integrations.lightning`)."""
