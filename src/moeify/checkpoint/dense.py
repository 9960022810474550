"""Read a dense gated-MLP decoder checkpoint lazily, tensor by tensor, from safetensors files."""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from moeify.errors import MoeifyError
from moeify.json_file import weight_map

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GATED_ACTIVATIONS = ("silu", "swish")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_model_config(path: Path) -> PretrainedConfig:
    """transformers' config of a model directory, or a one-line error naming its config.json."""
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"cannot read {path / 'config.json'}: {first_line}") from None


class DenseCheckpoint:
    """A Hugging Face model directory of a supported family; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = path
        if not (path / "config.json").is_file():
            raise MoeifyError(f"{path} has no config.json; point --model at a Hugging Face model directory or GGUF file")
        self.config: PretrainedConfig = read_model_config(path)
        self.family: str = self.config.model_type
        if self.family not in SUPPORTED_FAMILIES:
            raise MoeifyError(
                f"model type {self.family!r} is not supported; moeify reads the gated-MLP decoder "
                f"families {', '.join(SUPPORTED_FAMILIES)}"
            )
        self._file_of = self._tensor_files()
        for file in self.files():
            self._open(file)  # every weight file present with a readable header, before any work starts
        self._check_gated_mlp()
        self._check_shapes()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            return {name: self.path / file for name, file in weight_map(index).items()}
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        if any(self.path.glob("*.bin")):
            raise MoeifyError(
                f"{self.path} holds PyTorch .bin weights; re-save the model with safetensors "
                "(model.save_pretrained(dir, safe_serialization=True))"
            )
        raise MoeifyError(f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}; it is not a safetensors model directory")

    def _check_gated_mlp(self) -> None:
        if "model.layers.0.mlp.gate_proj.weight" not in self._file_of:
            raise MoeifyError(
                f"{self.path}: layer 0 has no mlp.gate_proj; moeify needs a gated (SwiGLU) MLP with "
                "gate_proj/up_proj/down_proj"
            )
        activation = getattr(self.config, "hidden_act", "silu")
        if activation not in GATED_ACTIVATIONS:
            raise MoeifyError(f"{self.path}: MLP activation {activation!r} is not SiLU; moeify needs a SwiGLU MLP")
        if getattr(self.config, "mlp_bias", False):
            raise MoeifyError(f"{self.path}: the MLP has biases (mlp_bias=true), which no stock MoE format holds")

    def _check_shapes(self) -> None:
        """The weights have the sizes config.json gives (a wrong intermediate_size would otherwise give wrong experts)."""
        D, F, L = self.hidden_size, self.ffn_size, self.num_layers
        wanted = {"model.embed_tokens.weight": (int(self.config.vocab_size), D)}
        for layer in range(L):
            prefix = f"model.layers.{layer}.mlp"
            wanted |= {f"{prefix}.gate_proj.weight": (F, D), f"{prefix}.up_proj.weight": (F, D), f"{prefix}.down_proj.weight": (D, F)}
        fix = "fix config.json or re-download the model"
        for name, shape in wanted.items():
            if name not in self._file_of:
                raise MoeifyError(f"the dense checkpoint {self.path} lacks {name} (config.json gives {L} layers); it is incomplete: "
                                  f"re-download or re-convert it, or fix config.json")
            found = self.shape(name)
            if found != shape:
                raise MoeifyError(f"{self.path}: {name} is {list(found)}, but config.json (hidden_size {D}, intermediate_size {F}, "
                                  f"vocab_size {self.config.vocab_size}) implies {list(shape)}; {fix}")
        if f"model.layers.{L}.mlp.gate_proj.weight" in self._file_of:
            raise MoeifyError(f"{self.path} holds more layers than config.json's num_hidden_layers {L}; {fix}")

    def _open(self, file: Path):
        """A fresh handle per read: the file is memory-mapped only while one tensor is copied out, so
        pages of the dense model never accumulate in this process's resident memory."""
        if not file.is_file():
            raise MoeifyError(f"missing weight file {file}; re-download or re-convert the model")
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as error:
            raise MoeifyError(
                f"cannot read {file}: it is truncated or not a safetensors file ({error}); re-download or re-convert it"
            ) from None

    @property
    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise MoeifyError(f"{self.path} has no tensor {name!r}; the checkpoint is incomplete")
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise MoeifyError(f"cannot read tensor {name} from {self._file_of[name]}: {error}; re-download it") from None

    def block(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """A box of a tensor (one slice per leading dimension), read from disk without loading the rest."""
        if name not in self._file_of:
            raise MoeifyError(f"{self.path} has no tensor {name!r}; the checkpoint is incomplete")
        try:
            return self._open(self._file_of[name]).get_slice(name)[box]
        except (SafetensorError, OSError) as error:
            raise MoeifyError(f"cannot read tensor {name} from {self._file_of[name]}: {error}; re-download it") from None

    def missing(self, names: list[str]) -> list[str]:
        return [name for name in names if name not in self._file_of]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        return self.get("model.layers.0.mlp.gate_proj.weight").dtype

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def ffn_size(self) -> int:
        return int(self.config.intermediate_size)

    def ffn(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [F, D], up [F, D], down [D, F]) of one layer."""
        prefix = f"model.layers.{layer}.mlp"
        return (self.get(f"{prefix}.gate_proj.weight"), self.get(f"{prefix}.up_proj.weight"), self.get(f"{prefix}.down_proj.weight"))

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def parameter_count(self) -> int:
        """Unique parameters (tied embeddings counted once, as they are stored once)."""
        return sum(_numel(self.shape(name)) for name in self._file_of)


def is_ffn_tensor(name: str) -> bool:
    return ".mlp." in name


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
