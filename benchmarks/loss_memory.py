"""Peak memory of one training step with the full cross-entropy vs the chunked one (--loss-chunk).

Each variant runs in its own process (peak RSS is per process): SmolLM2-135M dense, fp32, one
optimizer step of 8 sequences x 512 tokens on the embedded corpus. Prints and writes JSON.
Usage: python benchmarks/loss_memory.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = """
import resource, sys
from moeify.train.config import TrainConfig
from moeify.train.loop import train
chunk, out, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
train(TrainConfig(model="smollm2-135m", data=data, out=out, batch_size=8, micro_batch=8, max_tokens=8 * 512, eval_blocks=1,
                  loss_chunk=chunk, export=False, force=True), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    from moeify.data.prepare import PrepareConfig, prepare

    data = str(prepare(PrepareConfig("smollm2-135m", seq_len=512), progress=False).path)
    results = {}
    for chunk in (0, 1024):
        with tempfile.TemporaryDirectory() as out:
            run = subprocess.run([sys.executable, "-c", STEP, str(chunk), out, data], capture_output=True, text=True, check=True)
            results[chunk] = float(run.stdout.strip().splitlines()[-1])
    logits_mb = 8 * 511 * 49152 * 4 / 2**20
    print(f"peak RSS, full cross-entropy: {results[0]:.0f} MiB; chunked (1024 positions): {results[1024]:.0f} MiB; "
          f"saved {results[0] - results[1024]:.0f} MiB (the fp32 logits alone are {logits_mb:.0f} MiB)")
    path = Path(__file__).parent / "results" / "loss_memory.json"
    path.write_text(json.dumps({"peak_rss_mb": results, "fp32_logits_mb": logits_mb}, indent=2) + "\n")


if __name__ == "__main__":
    main()
