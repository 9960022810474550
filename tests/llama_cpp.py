"""llama.cpp for the engine tests, from a registry package: the PyPI sdist of llama-cpp-python ships
the llama.cpp tree (its HF -> GGUF converter included); the runtime is built from it with cmake once
and cached under the moeify cache (`MOEIFY_CACHE`), `llama.cpp-<version>/`."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from moeify.checkpoint.resolve import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp is what the tests convert and run with
TARGET = "llama-perplexity"
TOOLS = (TARGET, "llama-bench")  # built together: the tree is moved after its build, so cmake cannot add a target later


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def llama_cpp() -> Path:
    """The llama.cpp tree with build/bin/llama-perplexity built (downloaded and built on first use)."""
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if all((root / "build" / "bin" / name).exists() for name in TOOLS):
        return root
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        tree = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        _run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DBUILD_SHARED_LIBS=OFF"])  # static: the tree is renamed after the build
        _run(["cmake", "--build", str(tree / "build"), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)])
        shutil.rmtree(root, ignore_errors=True)
        tree.rename(root)  # complete or absent
    return root


def tool(root: Path, name: str) -> Path:
    """One of the built programs (TOOLS)."""
    return root / "build" / "bin" / name


def convert(root: Path, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own converter, fp32 by default (so the GGUF holds the checkpoint's exact values)."""
    _run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype, "--outfile", str(out)])
    return out


def perplexity(root: Path, gguf: Path, text: Path, context: int, chunks: int) -> float:
    """llama.cpp's perplexity of `text` (its final estimate)."""
    result = _run([str(root / "build" / "bin" / TARGET), "-m", str(gguf), "-f", str(text), "-c", str(context),
                   "--chunks", str(chunks), "-t", str(os.cpu_count() or 2), "-b", str(context)])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    if match is None:
        raise RuntimeError(f"no perplexity in llama.cpp's output:\n{result.stderr[-3000:]}")
    return float(match.group(1))
