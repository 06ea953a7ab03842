"""COCO detection on mmdet. Importing it lets mmcv-lite find moca-eval's ``mmcv._ext`` (``mm_ops``)."""

from moca_eval import mm_ops

mm_ops.install()
