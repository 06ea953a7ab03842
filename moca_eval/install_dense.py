"""Install the dense-task stack (mmcv, mmengine, mmsegmentation, mmdet) into this venv.

    python -m moca_eval.install_dense [--compile [--rebuild]]

By default this is ``pip install`` of moca-eval's ``[dense]`` extra, nothing built: mmcv-lite
2.1.0 (mmcv's Python package, the newest version mmdet 3.3.0 accepts, without the compiled
``mmcv._ext``) and moca-eval's ``mm_ops`` in place of that extension (RoIAlign and NMS on
torchvision's CPU/CUDA kernels; any other mmcv op raises a one-line error pointing here).

``--compile`` installs a compiled mmcv instead, for mmcv ops moca-eval does not provide: mmcv
has no wheel for current torch, so its 2.1.0 source release is built here, once, and the wheel
cached under ``~/.cache/moca-eval/wheels/<key>/`` (``$MOCA_EVAL_WHEEL_CACHE`` overrides the
root), keyed by mmcv, torch, CUDA/CPU, Python and machine; later installs reuse it in seconds.
The build needs what the sdist does not say: its ``-std=c++14/17`` flags raised to ``-std=c++20``
(torch >= 2.10 headers), setuptools < 81 (its setup.py imports ``pkg_resources``) and
``--no-build-isolation`` with ``MMCV_WITH_OPS=1`` (an isolated build cannot see torch and ships
a wheel WITHOUT the compiled ops; the wheel is checked for them). CUDA ops are built where
torch sees a GPU (mmcv's own rule; ``FORCE_CUDA=1`` forces it; it needs an nvcc matching
torch's CUDA). mmcv-lite is uninstalled first (both install the ``mmcv`` package); the compiled
``mmcv._ext`` is then found before moca-eval's. About 15 minutes for the CPU build on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

MMCV_VERSION = "2.1.0"
LITE = "mmcv-lite"
BUILD_REQUIREMENTS = ("setuptools<81", "wheel", "ninja")
CXX_STD = re.compile(r"-std=c\+\+1[47]")


class InstallError(RuntimeError):
    """A step of the dense install failed (the message says which and what to do)."""


@contextlib.contextmanager
def dense_stack(task: str) -> Iterator[None]:
    """An ImportError inside the block becomes a one-line ConfigError saying how to install."""
    from moca_eval import mm_ops
    from moca_eval.errors import ConfigError

    mm_ops.install()
    try:
        yield
    except ImportError as err:
        raise ConfigError(f"the {task} stack is not installed ({err}); run "
                          "`python -m moca_eval.install_dense` first") from None


def wheel_cache_root() -> Path:
    root = os.environ.get("MOCA_EVAL_WHEEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moca-eval" / "wheels"


def build_key() -> str:
    """What the compiled wheel depends on: mmcv, torch, CUDA or CPU ops, Python, machine."""
    import torch

    cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
    ops = f"cu{torch.version.cuda}" if cuda and torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"mmcv-{MMCV_VERSION}-torch-{torch.__version__.replace('+', '_')}-{ops}-{py}-{platform.machine()}"


def has_ops(wheel: Path) -> bool:
    """Whether a built mmcv wheel contains the compiled extension ``mmcv/_ext*.so``."""
    with zipfile.ZipFile(wheel) as zf:
        return any(re.fullmatch(r"mmcv/_ext[^/]*\.(so|pyd)", name) for name in zf.namelist())


def patch_cxx_standard(setup_py: Path) -> int:
    """Raise every ``-std=c++14``/``-std=c++17`` in mmcv's setup.py to C++20; returns the count."""
    text = setup_py.read_text()
    patched, count = CXX_STD.subn("-std=c++20", text)
    setup_py.write_text(patched)
    return count


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise InstallError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}")


def build_mmcv_wheel(dest: Path) -> Path:
    """Download the mmcv sdist, patch it, build a wheel with ops into ``dest``; returns it."""
    _pip("install", "-q", *BUILD_REQUIREMENTS)
    with tempfile.TemporaryDirectory(prefix="mmcv-build-") as tmp:
        work = Path(tmp)
        _pip("download", "-q", f"mmcv=={MMCV_VERSION}", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", "-d", str(work))
        sdists = sorted(work.glob("mmcv-*.tar.gz"))
        if not sdists:
            raise InstallError(f"pip download did not produce an mmcv {MMCV_VERSION} sdist in {work}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(work, filter="data")
        src = work / f"mmcv-{MMCV_VERSION}"
        count = patch_cxx_standard(src / "setup.py")
        if count == 0:
            raise InstallError(f"{src / 'setup.py'}: no -std=c++14/17 flag found to raise to C++20")
        env = {**os.environ, "MMCV_WITH_OPS": "1", "MAX_JOBS": str(os.cpu_count() or 1)}
        print(f"building mmcv {MMCV_VERSION} with ops ({count} C++ flags set to c++20); "
              "about 15 minutes on 2 cores", flush=True)
        started = time.time()
        out = work / "wheel"
        _pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(out), str(src), env=env)
        wheels = sorted(out.glob("mmcv-*.whl"))
        if not wheels or not has_ops(wheels[0]):
            raise InstallError("the mmcv wheel was built WITHOUT its compiled ops (mmcv/_ext); "
                               "is torch importable in this environment?")
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / wheels[0].name
        shutil.copy2(wheels[0], final.with_suffix(".part"))
        os.replace(final.with_suffix(".part"), final)  # a half-copied wheel is never "cached"
        print(f"built {final.name} in {(time.time() - started) / 60:.1f} min", flush=True)
        return final


def cached_wheel(dest: Path) -> Path | None:
    wheels = sorted(p for p in dest.glob("mmcv-*.whl") if has_ops(p)) if dest.is_dir() else []
    return wheels[-1] if wheels else None


def dense_requirements() -> list[str]:
    """The ``[dense]`` extra of the installed moca-eval (pyproject.toml is the one source)."""
    reqs = md.requires("moca-eval") or []
    pattern = re.compile(r"""extra\s*==\s*["']dense["']""")
    dense = [r.split(";")[0].strip() for r in reqs if pattern.search(r)]
    if not dense:
        raise InstallError("the installed moca-eval lists no [dense] extra (installed from an older "
                           "checkout?): reinstall it (`pip install -e .`) and run this again")
    return dense


def check_stack() -> None:
    """``mmcv.ops``, mmseg and mmdet import in a fresh interpreter (through moca-eval's packages)."""
    code = "import moca_eval.detection, moca_eval.segmentation, mmcv.ops, mmseg, mmdet"
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if check.returncode:
        raise InstallError(f"the dense stack does not import: {check.stderr.strip().splitlines()[-1]}")


def install(*, compiled: bool = False, rebuild: bool = False) -> Path | None:
    """Install the ``[dense]`` extra; with ``compiled``, a built (or cached) mmcv wheel in place of
    mmcv-lite. Returns the compiled wheel, if any."""
    wheel = None
    if compiled:
        dest = wheel_cache_root() / build_key()
        wheel = None if rebuild else cached_wheel(dest)
        if wheel is None:
            wheel = build_mmcv_wheel(dest)
        else:
            print(f"reusing the cached {wheel}", flush=True)
    reqs = dense_requirements()
    if wheel is None:
        _pip("install", "-q", *reqs)
    else:
        _pip("install", "-q", *[r for r in reqs if not r.startswith(LITE)])
        _pip("uninstall", "-q", "-y", LITE)
        _pip("install", "-q", "--force-reinstall", "--no-deps", str(wheel))
    check_stack()
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moca_eval.install_dense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true",
                        help="build (or reuse a cached) mmcv with all its compiled ops instead of mmcv-lite")
    parser.add_argument("--rebuild", action="store_true",
                        help="with --compile: build even if a wheel is cached")
    args = parser.parse_args(argv)
    if args.rebuild and not args.compile:
        parser.error("--rebuild needs --compile")
    try:
        wheel = install(compiled=args.compile, rebuild=args.rebuild)
    except InstallError as err:
        print(f"install_dense: error: {err}", file=sys.stderr)
        return 1
    print(f"dense stack installed (mmcv from {wheel.name if wheel else LITE + ' with moca-eval ops'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
