"""MOCA pretraining (Gidaris et al., TMLR 2024): a minimal, faithful implementation.

``run(PretrainConfig) -> PretrainResult`` trains a student ViT against an EMA teacher's
online-codebook assignments and writes MOCA-layout checkpoints whose teacher every
protocol of moca-eval evaluates. ``preset('tiny')`` runs on the demo data on a CPU.
"""

from moca_eval.pretrain.config import PRESETS, PretrainConfig, preset
from moca_eval.pretrain.train import PretrainResult, run

__all__ = ["PRESETS", "PretrainConfig", "PretrainResult", "preset", "run"]
