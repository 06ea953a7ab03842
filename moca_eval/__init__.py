"""moca-eval: evaluate self-supervised ViT checkpoints with the published protocols."""

__version__ = "0.1.0"
