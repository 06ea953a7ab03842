"""bench/gpu_check.py runs end to end on CPU with tiny sizes, so the GPU script cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_check_tiny_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["tiny"] and report["meta"]["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == ["extract", "faiss", "lowshot", "pretrain", "seg", "det"]
    for name in ("extract", "faiss", "lowshot", "pretrain"):
        assert sections[name]["status"] == "ok", sections[name]

    extract = sections["extract"]
    assert extract["images"] == 12
    assert finite_positive(extract["fp32_images_per_s"]) and finite_positive(extract["bf16_images_per_s"])
    assert 0.99 < extract["bf16_min_cosine_to_fp32"] <= 1.0 + 1e-6

    knn = sections["faiss"]
    assert (knn["train"], knn["queries"], knn["k"], knn["gpu"]) == (3000, 100, 20, False)
    assert finite_positive(knn["float32_seconds"]) and finite_positive(knn["float16_seconds"])
    assert knn["float16_top1_neighbour_agreement"] >= 0.9

    lowshot = sections["lowshot"]
    for key in ("lambda_0.1", "lambda_0.00025"):
        fit = lowshot[key]
        assert fit["converged"] and fit["passes"] >= 1 and 0 <= fit["gap"] < 1e-6
        assert 0 < fit["objective"] < math.log(lowshot["classes"])
    assert lowshot["lambda_0.00025"]["objective"] < lowshot["lambda_0.1"]["objective"]

    pretrain = sections["pretrain"]
    assert pretrain["memory_measure"] == "saved_MiB"
    assert pretrain["partial_decoding_saves_memory"] and 0 < pretrain["partial_over_full_memory"] < 1
    assert all(finite_positive(v["step_s"]) for v in pretrain["variants"].values())

    for name, module in (("seg", "mmseg"), ("det", "mmdet")):
        if importlib.util.find_spec(module) is None:
            assert sections[name]["status"] == "skipped" and module in sections[name]["reason"]
        else:
            assert finite_positive(sections[name]["seconds_train_and_eval"])
