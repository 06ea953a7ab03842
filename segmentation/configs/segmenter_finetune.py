# Fine-tuning: the whole network with Segmenter's mask-transformer decoder of ONE layer (the
# paper's setting; Segmenter's default is 2); optional layer-wise lr decay (run(): --layer-decay).
_base_ = ["./_base_cityscapes.py"]

embed_dim = 768
model = dict(
    backbone=dict(frozen=False, drop_path_rate=0.1),
    decode_head=dict(
        type="SegmenterMaskTransformerHead",
        in_channels=embed_dim,
        channels=embed_dim,
        num_classes=19,
        num_layers=1,
        num_heads=12,
        embed_dims=embed_dim,
        dropout_ratio=0.0,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
)
