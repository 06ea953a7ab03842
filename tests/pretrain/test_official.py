"""MOCA's own training checkpoints, both ways: a hand-written official ``checkpoint-last.pth``
(keys, shapes, optimizer and args as valeoai/MOCA's ``main_pretrain.py`` saves them, read from
``models_moca.py`` and ``util/misc.py``; tiny sizes) is resumed, and ours has the same layout.
"""

import argparse
import json

import pytest
import torch

from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.errors import ConfigError
from moca_eval.pretrain import preset, run
from moca_eval.pretrain.checkpoint import load_for_resume, save_checkpoint
from moca_eval.pretrain.model import MOCA
from moca_eval.pretrain.official import config_from_args
from moca_eval.pretrain.train import build_optimizer

WIDTH, DEPTH, GRID, PATCH = 192, 12, 6, 8  # moca_vit_tiny_patch8 at 48 px
DEC, DEC_DEPTH, WORDS, HIDDEN = 32, 1, 32, 384  # decoder 32 x 1 block, K = 32, 2 x width
BOW = "bow_extractor.bow_extractor.0."


def block(prefix, dim):
    """timm ``Block`` parameters, registration order, with MOCA's weight-decay rule (ndim > 1)."""
    return [(prefix + "norm1.weight", (dim,)), (prefix + "norm1.bias", (dim,)),
            (prefix + "attn.qkv.weight", (3 * dim, dim)), (prefix + "attn.qkv.bias", (3 * dim,)),
            (prefix + "attn.proj.weight", (dim, dim)), (prefix + "attn.proj.bias", (dim,)),
            (prefix + "norm2.weight", (dim,)), (prefix + "norm2.bias", (dim,)),
            (prefix + "mlp.fc1.weight", (4 * dim, dim)), (prefix + "mlp.fc1.bias", (4 * dim,)),
            (prefix + "mlp.fc2.weight", (dim, 4 * dim)), (prefix + "mlp.fc2.bias", (dim,))]


def generator(prefix, out, *, skip):
    """``BoWPredictor.layers_w[0]`` (``ResWGEN``): b0_fc (no bias), b0_bn, b0_last_layer, skip."""
    params = [(prefix + "generator.b0_fc.weight", (HIDDEN, WIDTH)),
              (prefix + "generator.b0_bn.weight", (HIDDEN,)), (prefix + "generator.b0_bn.bias", (HIDDEN,)),
              (prefix + "generator.b0_last_layer.weight", (out, HIDDEN)),
              (prefix + "generator.b0_last_layer.bias", (out,))]
    if skip:
        params += [(prefix + "skip.weight", (out, WIDTH)), (prefix + "skip.bias", (out,))]
    return params


def trainable():
    """``MOCA.named_parameters()`` with ``requires_grad``, in MOCA's order (own parameters
    first: ``decoder_pos_embed`` is frozen, ``mask_token_cls_pt`` is not; then the modules)."""
    encoder = [("encoder.cls_token", (1, 1, WIDTH)),
               ("encoder.patch_embed.proj.weight", (WIDTH, 3, PATCH, PATCH)),
               ("encoder.patch_embed.proj.bias", (WIDTH,))]
    for i in range(DEPTH):
        encoder += block(f"encoder.blocks.{i}.", WIDTH)
    encoder += [("encoder.norm.weight", (WIDTH,)), ("encoder.norm.bias", (WIDTH,))]
    decoder = [("norm_cls_pt.weight", (WIDTH,)), ("norm_cls_pt.bias", (WIDTH,)),
               ("decoder_embed_cls_pt.weight", (DEC, WIDTH)), ("decoder_embed_cls_pt.bias", (DEC,))]
    for i in range(DEC_DEPTH):
        decoder += block(f"decoder_blocks_cls_pt.{i}.", DEC)
    decoder += [("decoder_norm_cls_pt.weight", (DEC,)), ("decoder_norm_cls_pt.bias", (DEC,))]
    return ([("mask_token_cls_pt", (1, 1, DEC))] + encoder
            + generator("encoder_pred.layers_w.0.", WIDTH, skip=False) + decoder
            + generator("decoder_pred.layers_w.0.", DEC, skip=True))


def groups():
    """``initialize_optimizer``: no_decay, decay, wgen_no_decay, wgen_decay, in that order."""
    out = {(w, d): [] for w in (False, True) for d in (False, True)}
    for name, shape in trainable():
        decay = len(shape) > 1 and not name.endswith(".bias")
        wgen = name.startswith(("encoder_pred.layers_w.", "decoder_pred.layers_w."))
        out[(wgen, decay)].append((name, shape))
    return [out[(False, False)], out[(False, True)], out[(True, False)], out[(True, True)]]


def model_state(gen):
    """Every key of MOCA's ``state_dict()``: parameters, frozen positions, BN and codebook buffers."""
    shapes = dict(trainable())
    shapes |= {k.replace("encoder.", "encoder_teacher.", 1): v for k, v in shapes.items()
               if k.startswith("encoder.")}
    shapes |= {"decoder_pos_embed": (1, GRID**2 + 1, DEC), "encoder.pos_embed": (1, GRID**2 + 1, WIDTH),
               "encoder_teacher.pos_embed": (1, GRID**2 + 1, WIDTH)}
    state = {k: torch.randn(v, generator=gen) * 0.02 for k, v in shapes.items()}
    for pred in ("encoder_pred", "decoder_pred"):
        bn = f"{pred}.layers_w.0.generator.b0_bn."
        state |= {bn + "running_mean": torch.randn(HIDDEN, generator=gen),
                  bn + "running_var": torch.rand(HIDDEN, generator=gen) + 0.5,
                  bn + "num_batches_tracked": torch.tensor(6), f"{pred}.scale": torch.tensor([3.0])}
    words = torch.nn.functional.normalize(torch.randn(WORDS, WIDTH, generator=gen), dim=1)
    state |= {BOW + "_embedding": words, BOW + "_embedding_ptr": torch.tensor([24]),
              BOW + "_track_num_batches": torch.tensor([6.0]), BOW + "_dist_norm": torch.tensor([0.3125]),
              BOW + "_dist_norm_prev": torch.tensor([0.3125])}
    return state


def optimizer_state():
    """AdamW ``state_dict()``: parameters numbered group by group; exp_avg of parameter i is
    filled with i / 1000 (to check where each one lands)."""
    params, state, index = [], {}, 0
    for names in groups():
        ids = []
        for _, shape in names:
            state[index] = {"step": torch.tensor(6.0), "exp_avg": torch.full(shape, index / 1000),
                            "exp_avg_sq": torch.full(shape, 1e-6)}
            ids.append(index)
            index += 1
        params.append(ids)
    flags = [(False, False, 0.0), (False, True, 0.05), (True, False, 0.0), (True, True, 0.05)]
    param_groups = [{"lr": 1.5e-4 * 8 / 256, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd,
                     "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                     "differentiable": False, "fused": None, "is_wgen": w, "use_wd": d, "params": ids}
                    for (w, d, wd), ids in zip(flags, params)]
    return {"state": state, "param_groups": param_groups}


def official_args():
    """``main_pretrain.py``'s Namespace as saved: parser defaults, the README's v1.0 overrides,
    tiny sizes, and what the script adds (rank, gpu, lr, lr_wgen, num_mviews, lr_epochs, ...)."""
    return argparse.Namespace(
        data_path="/datasets/ImageNet/", output_dir="out", resume="", resume_if_exists=False,
        resume_only_model=False, model="moca_vit_tiny_patch8_dec32d1b", input_size=48, kappa=3.0,
        inv_delta=10.0, num_words=WORDS, img_weight=0.5, loc_weight=0.5, num_new_words=8,
        early_layer=4, pretrained_teacher=None, pred_mlp_ratio=2.0, avg_pooling=True,
        mask_ratio=[0.55, 0.75], dec_mask_ratio=[0.35, 0.55], seed=0, batch_size=4, accum_iter=1,
        start_epoch=0, max_epochs=4, lr_epochs_mul=1.25, warmup_epochs=1, lr=1.5e-4 * 8 / 256,
        blr=1.5e-4, lr_wgen=1e-4, weight_decay=0.05, weight_decay_end=0.2, alpha=0.994,
        alpha_cos=True, clip_grad=0.1, no_fp16=False, init_scale=65536.0, num_workers=10,
        crop_min=0.2, subset=-1, pin_mem=True, world_size=2, local_rank=-1, dist_url="env://",
        backend="nccl", device="cuda", eval_every=20, start_with_knn=False, skip_knn=False,
        evaluate=False, nb_knn=[10, 20], temperature=0.07, eval_teacher=False, num_workers_knn=10,
        batch_size_knn=4, set_detect_anomaly=False, log_freq=20, no_tensorboard=False, rank=0, gpu=0,
        distributed=True, dist_backend="nccl", num_mviews=2, weight_decay_wgen=0.05, lr_epochs=5,
        output_log_file="out/log.txt", log_dir="out/tensorboard",
    )


def release_tiny(**overrides):
    """Our settings for that run: the release preset at the tiny sizes (global batch 8)."""
    base = dict(arch="vit_tiny", img_size=48, patch_size=PATCH, num_words=WORDS, num_new_words=4,
                decoder_dim=DEC, decoder_depth=DEC_DEPTH, decoder_heads=16, decoder_layer=8,
                epochs=4, warmup_epochs=1, batch_size=8, num_workers=0, progress=False)
    return preset("vit_base_release", **{**base, **overrides})


@pytest.fixture
def official_ckpt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ckpt = {"model": model_state(gen), "optimizer": optimizer_state(), "epoch": 1, "args": official_args(),
            "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000, "_growth_tracker": 17}}
    path = tmp_path / "official" / "checkpoint-1.pth"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path, ckpt


def test_official_args_translate_to_our_settings():
    values = config_from_args(official_args(), source="x")
    assert values["batch_size"] == 8 and values["num_new_words"] == 4  # 4 x 2 GPUs; 8 // 2 per step
    assert values["decoder_layer"] == 8 and values["partial_decoding"] == 0.2  # 12 - 4; 0.55 - 0.35
    assert (values["momentum"], values["momentum_end"], values["weight_decay_end"]) == (0.994, 1.0, 0.2)
    assert (values["decoder_heads"], values["border"], values["clip_grad"]) == (16, 2, 0.1)
    cfg = release_tiny()
    assert all(getattr(cfg, k) == v for k, v in values.items() if k not in ("lr", "mask_ratios", "epochs"))
    assert values["lr"] == cfg.base_lr()


def test_resume_from_a_hand_written_official_checkpoint(official_ckpt, tmp_path):
    path, ckpt = official_ckpt
    cfg = release_tiny(resume=True, resume_from=str(path), output_dir=str(tmp_path / "run"))
    model = MOCA(cfg)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu")
    assert load_for_resume(tmp_path, cfg, model=model, optimizer=optimizer, scaler=scaler) == 2
    state = ckpt["model"]
    book = model.bow_extractor
    assert torch.equal(book.codebook.words, state[BOW + "_embedding"]) and int(book.codebook.ptr) == 24
    assert float(book.mu_msd) == 0.3125 and float(book.num_updates) == 6.0
    assert torch.equal(model.decoder.embed.weight, state["decoder_embed_cls_pt.weight"])
    assert torch.equal(model.decoder_pred.generator.b0_bn.running_var,
                       state["decoder_pred.layers_w.0.generator.b0_bn.running_var"])
    assert torch.equal(model.encoder_teacher.blocks[3].mlp.fc2.weight,
                       state["encoder_teacher.blocks.3.mlp.fc2.weight"])
    # optimizer: the parameter MOCA numbers i holds exp_avg i / 1000, in every group
    params = dict(model.named_parameters())
    ours = {"mask_token_cls_pt": "decoder.mask_token", "encoder.cls_token": "encoder.cls_token",
            "norm_cls_pt.bias": "decoder.norm_in.bias",
            "encoder_pred.layers_w.0.generator.b0_fc.weight": "encoder_pred.generator.b0_fc.weight",
            "decoder_pred.layers_w.0.skip.bias": "decoder_pred.skip.bias"}
    flat = [name for names in groups() for name, _ in names]
    for official_name, our_name in ours.items():
        value = optimizer.state[params[our_name]]["exp_avg"]
        assert torch.all(value == flat.index(official_name) / 1000), official_name
        assert float(optimizer.state[params[our_name]]["step"]) == 6.0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05, 0.0, 0.05]
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["_growth_tracker"] == 17


def test_our_checkpoint_has_mocas_keys_shapes_optimizer_and_args(official_ckpt, tmp_path):
    path, ckpt = official_ckpt
    cfg = release_tiny(precision="fp16")
    model = MOCA(cfg)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu")
    load_for_resume(tmp_path, release_tiny(resume_from=str(path)), model=model, optimizer=optimizer,
                    scaler=scaler)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, epoch=1, cfg=cfg, world_size=2, scaler=scaler)
    ours = read_checkpoint(tmp_path / "checkpoint-last.pth")
    assert set(ours) == set(ckpt)
    assert {k: tuple(v.shape) for k, v in ours["model"].items()} == {
        k: tuple(v.shape) for k, v in ckpt["model"].items()}
    assert all(torch.equal(ours["model"][k], v) for k, v in ckpt["model"].items())  # round trip
    assert [g["params"] for g in ours["optimizer"]["param_groups"]] == [
        g["params"] for g in ckpt["optimizer"]["param_groups"]]
    for index, entry in ckpt["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][index]["exp_avg"], entry["exp_avg"])
    assert ours["scaler"] == ckpt["scaler"]
    args, theirs = vars(ours["args"]), vars(ckpt["args"])
    for key in ("model", "input_size", "batch_size", "world_size", "num_new_words", "early_layer",
                "mask_ratio", "dec_mask_ratio", "max_epochs", "lr_epochs", "alpha", "weight_decay_end",
                "clip_grad", "lr", "lr_wgen", "no_fp16", "num_mviews"):
        assert args[key] == theirs[key], key


def test_run_continues_an_official_checkpoint_and_checks_its_settings(official_ckpt, image_dir, tmp_path):
    path, _ = official_ckpt
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="momentum 0.994 -> 0.99"):  # the paper preset differs
        run(preset("vit_base", **{**release_tiny().to_dict(), "momentum": 0.99, "weight_decay_end": None,
                                  "data_dir": str(image_dir), "output_dir": str(out),
                                  "resume": True, "resume_from": str(path), "mask_ratios": (0.55, 0.75)}))
    cfg = release_tiny(data_dir=str(image_dir), output_dir=str(out), resume=True, resume_from=str(path),
                       epochs=3)
    result = run(cfg)
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2, 2]  # 16 images, batch 8: epoch 2 only
    assert records[0]["tau"] == 0.03125  # the checkpoint's mu_MSD / 10
    saved = read_checkpoint(result.checkpoint)
    assert saved["epoch"] == 2 and float(saved["model"][BOW + "_track_num_batches"]) == 8.0
    assert int(saved["model"][BOW + "_embedding_ptr"]) == (24 + 2 * 4) % WORDS
