"""Cityscapes segmentation on mmseg. Importing it lets mmcv-lite find moca-eval's ``mmcv._ext``."""

from moca_eval import mm_ops

mm_ops.install()
