"""DDP: two CPU processes (torchrun, gloo) train exactly like one process on the same batches."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.pretrain import run

LAUNCH = textwrap.dedent("""
    import json, sys
    from moca_eval.pretrain import PretrainConfig, run
    run(PretrainConfig.from_dict(json.loads(sys.argv[1])))
""")


def _losses(path):
    return [[r[k] for k in ("loss", "loss_img", "loss_loc", "tau", "codebook_usage")]
            for r in map(json.loads, path.read_text().splitlines())]


def test_two_gloo_processes_match_one_process(micro_cfg, image_dir, tmp_path):
    single = run(micro_cfg(data_dir=str(image_dir), output_dir=str(tmp_path / "one")))
    cfg = micro_cfg(data_dir=str(image_dir), output_dir=str(tmp_path / "two"))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), json.dumps(cfg.to_dict())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ckpt = read_checkpoint(tmp_path / "two" / "checkpoint-last.pth")
    assert ckpt["args"].world_size == 2
    one, two = _losses(single.log_file), _losses(tmp_path / "two" / "log.jsonl")
    assert len(one) == len(two) == 4
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5)
    a = read_checkpoint(single.checkpoint)["model"]
    b = ckpt["model"]
    # the codebook was synchronised: same queue, same pointer, same mu_MSD as one process
    for key in ("bow_extractor.bow_extractor.0._embedding", "bow_extractor.bow_extractor.0._embedding_ptr",
                "bow_extractor.bow_extractor.0._dist_norm"):
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        if key.endswith("attn.qkv.bias"):
            # The key bias adds the same q.b_k to every logit of a softmax row: its gradient is
            # exactly zero, so only float noise reaches it, which Adam rescales to +-lr steps.
            # Compare the query and value biases only.
            q, _, v = value.view(3, -1)
            q2, _, v2 = b[key].view(3, -1)
            value, other = torch.cat([q, v]), torch.cat([q2, v2])
        else:
            other = b[key]
        assert torch.allclose(value, other, atol=1e-6), key
