# Linear probe: frozen backbone (no gradients, eval mode, no drop path) and one linear layer
# (mmseg FCNHead with no convolution: a 1x1 conv) on the final-LN patch tokens; the logits are
# upsampled bilinearly to the image.
_base_ = ["./_base_cityscapes.py"]

embed_dim = 768
model = dict(
    backbone=dict(frozen=True, drop_path_rate=0.0),
    decode_head=dict(
        type="FCNHead",
        in_channels=embed_dim,
        channels=embed_dim,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=19,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
)
