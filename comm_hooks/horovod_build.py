"""Build Horovod 0.28.1 for this torch from the registry's sdist, cache the wheel, install it.

Horovod 0.28.1 (the newest release) does not build against torch 2.x as shipped: torch's headers need
C++17 while Horovod asks for C++14, and CMake 4 rejects its bundled gloo. This applies both fixes (see
shared/REFERENCE.md), builds with PyTorch, Gloo and MPI support, and keeps the wheel in
``$GRADQ_CACHE`` (default ``~/.cache/gradq``), outside the repository, so later setups install it in
seconds. Run: ``python -m comm_hooks.horovod_build`` (about 8 minutes on 2 cores the first time).
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.28.1"
CACHE = Path(os.environ.get("GRADQ_CACHE", Path.home() / ".cache" / "gradq"))
PATCHED = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def cached_wheel() -> Path | None:
    """The cached wheel built for this Python, if any."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted(CACHE.glob(f"horovod-{VERSION}-{tag}-*.whl"))
    return found[-1] if found else None


def build() -> Path:
    """Download the sdist, patch it, and build the wheel into the cache; returns the wheel."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, f"horovod=={VERSION}")
        with tarfile.open(next(Path(tmp).glob("horovod-*.tar.gz"))) as sdist:
            sdist.extractall(tmp, filter="data")
        source = Path(tmp) / f"horovod-{VERSION}"
        for name in PATCHED:
            path = source / name
            text = path.read_text()
            if "set(CMAKE_CXX_STANDARD 14)" not in text:
                raise RuntimeError(f"{name} no longer sets C++14; the Horovod build fix needs revisiting")
            path.write_text(text.replace("set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)"))
        env = {
            **os.environ,
            "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
            "HOROVOD_WITH_PYTORCH": "1",
            "HOROVOD_WITHOUT_TENSORFLOW": "1",
            "HOROVOD_WITHOUT_MXNET": "1",
            "HOROVOD_WITH_GLOO": "1",
            "HOROVOD_WITH_MPI": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the venv's mpicxx
        }
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(CACHE), str(source)],
            check=True,
            env=env,
        )
    wheel = cached_wheel()
    if wheel is None:
        raise RuntimeError(f"the Horovod build finished but left no wheel in {CACHE}")
    return wheel


def main() -> None:
    wheel = cached_wheel()
    print(f"horovod: {'cached wheel ' + str(wheel) if wheel else 'building from source (about 8 minutes)'}", flush=True)
    wheel = wheel or build()
    _pip("install", "-q", "--no-deps", str(wheel))
    _pip("install", "-q", "cffi", "cloudpickle", "psutil", "pyyaml", "packaging")  # Horovod's runtime requirements
    subprocess.run([sys.executable, "-c", "import horovod.torch"], check=True)
    print(f"horovod {VERSION} installed from {wheel}")


if __name__ == "__main__":
    main()
