"""What every bench script shares: each side runs in a fresh subprocess (so its peak memory is its own) and
reports one JSON line; the parent prints the hardware and the ratios."""
import json
import os
import platform
import resource
import subprocess
import sys


def run_worker(argv):
    """Run `python argv...` and return the JSON object on its last stdout line; exit with its output if it fails."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.exit(f"worker {argv} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def peak_memory_bytes(device):
    """CUDA: peak allocated by torch. CPU: the process's peak RSS (ru_maxrss is in KiB on Linux)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hardware(threads=0):
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU x{os.cpu_count()} ({threads or torch.get_num_threads()} threads)"


# Published Qwen2.5 shapes (their config.json files), for benchmarks with random weights of a real size
QWEN25_SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
}
