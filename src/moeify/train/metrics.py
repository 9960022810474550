"""Throughput accounting and metric sinks (JSONL always, TensorBoard when installed)."""

import json
import resource
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the datasheets; the first key found in
# the device name wins (the H100's PCIe and NVL boards before the SXM one).
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def active_matmul_params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies by, with only k of E experts counted.

    The input embedding is a lookup, not a matmul; when it is tied to the output head it is one.
    """
    from moeify.evaluate.params import parameter_counts

    _, active = parameter_counts(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return active if tied else active - embed.numel()


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active matmul parameters + attention scores (PaLM appendix B).

    Attention: 12 * layers * hidden * seq_len (QK^T and AV, forward and backward).
    """
    config = model.config
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * _head_dim(config) * seq_len
    return 6 * active_matmul_params(model) + attention


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def datasheet_peak_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key in device_name), None)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU."""
    if override_tflops:
        return override_tflops * 1e12, "given by --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = datasheet_peak_tflops(name)
        if tflops is None:
            return 0.0, f"unknown GPU {name}: set --peak-tflops"
        return tflops * 1e12, f"{name} dense bf16 datasheet peak"
    return measured_matmul_flops(), "measured fp32 matmul rate of this CPU (1024^3, best of 3)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated on this process's GPU so far, MiB (None off CUDA: the RSS covers the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measured_matmul_flops(size: int = 1024) -> float:
    generator = torch.Generator().manual_seed(0)  # leave the global RNG (gating noise) untouched
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class MetricsLogger:
    """Rank 0 writes one JSON object per line to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, out: Path, enabled: bool, append: bool, after_step: int = 0):
        """`append` (a resumed run) keeps the records up to `after_step`, the step resumed from: those of
        steps run after its checkpoint, before the run stopped, are run again and logged again."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if append and path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= after_step]
            temporary = path.with_name(".metrics.jsonl.tmp")
            temporary.write_text("".join(kept))
            temporary.replace(path)
        self._file = open(path, "a" if append else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as after every step (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            flat.update({f"{name}/{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat
