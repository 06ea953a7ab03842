"""moca-eval: evaluate self-supervised ViT checkpoints with the published protocols.

One import for notebooks (everything heavy is imported on first use)::

    import moca_eval
    record = moca_eval.evaluate("teacher.pth", "knn", "/data/imagenet", ks=(20,))
    backbone = moca_eval.load_backbone("hf-hub:ORG/NAME")
    feats = moca_eval.extract_features("teacher.pth", "/data/imagenet", ("avg",), split="val")
    moca_eval.report(["runs/paper"], "report/")
"""

__version__ = "0.1.0"
__all__ = ["evaluate", "extract_features", "load_backbone", "report"]


def __getattr__(name: str):
    if name in __all__:
        from moca_eval import api

        return getattr(api, name)
    raise AttributeError(f"module 'moca_eval' has no attribute {name!r}")
