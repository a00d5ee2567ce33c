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
