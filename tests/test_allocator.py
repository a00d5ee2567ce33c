"""train_common.keep_freed_memory: on the CPU a freed block is reused, not handed back to the system and faulted in
again page by page (what made generation after a finely cut update slow); a setting of the environment's own wins.
Each case in a fresh interpreter, since the setting holds for the whole process."""
import os
import platform
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

SCRIPT = """
import resource
import torch
from train_common import keep_freed_memory

made = keep_freed_memory()
for _ in range(2):  # (a block may not fit the hole of the one before, aligned: the heap settles after a few)
    x = torch.ones(16 << 20)  # 64 MiB: far above glibc's default mmap threshold
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    x = torch.ones(16 << 20)
    del x
print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


BIG = """
from train_common import keep_freed_memory
import torch

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

made = keep_freed_memory()
before = rss_mib()
x = torch.ones(128 << 20)  # 512 MiB: at or above the threshold, so mapped for itself
during = rss_mib()
del x
print(made, during - before, rss_mib() - before)
"""


def _run(script=SCRIPT, **env):
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": REPO, **env}).stdout.split()
    return out[0] == "True", *map(int, out[1:])


def test_freed_blocks_are_reused():
    """Six 64 MiB blocks, each freed before the next: at most one comes fresh from the system (16,384 4-KiB pages)
    when the others reuse the kept heap; without the setting each does (98,304 faults)."""
    made, faults = _run()
    assert made and faults <= 16384 + 1000


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_environments_own_setting_wins(env):
    assert not _run(**env)[0]


def test_big_blocks_go_back_to_the_system():
    """A 512 MiB block (a micro-batch's activations, the update's [chunk, vocab] buffer) is unmapped when freed: kept in
    the heap, such blocks leave holes that the next, differently sized ones do not fit, and the peak RSS grows."""
    made, during, after = _run(BIG)
    assert made and during >= 500 and after < 16
