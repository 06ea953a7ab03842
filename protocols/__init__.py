"""Evaluation protocols: each module exposes ``<Name>Config``, ``run(cfg) -> <Name>Result``."""
