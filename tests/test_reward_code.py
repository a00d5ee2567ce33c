"""Sandbox tests for code_reward: hostile completions score 0, return within the
timeout, leave no processes behind and do not touch the test process."""
import os
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reward import REWARDS, code_reward  # noqa: E402
from helpers import sandbox_processes  # noqa: E402

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


@pytest.fixture(autouse=True)
def no_leftovers():
    assert sandbox_processes() == []
    yield
    assert sandbox_processes() == [], "code_reward left sandbox processes running"


def test_correct_partial_and_wrong_solutions():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert code_reward(good, ADD_TESTS) == 1.0
    assert code_reward("```python\ndef add(a, b):\n    return a * 2\n```", ADD_TESTS) == pytest.approx(1 / 3)
    assert code_reward("def add(a, b):\n    return -1", ADD_TESTS) == 0.0
    assert code_reward("<think>```python\nbroken(\n```</think>def add(a, b): return a + b", ADD_TESTS) == 1.0
    assert code_reward("def add(a, b) return", ADD_TESTS) == 0.0  # syntax error
    assert code_reward("raise SystemExit(0)", ADD_TESTS) == 0.0
    assert code_reward("", ADD_TESTS) == 0.0
    assert code_reward("def add(a, b): return a + b", []) == 0.0


def test_common_stdlib_imports_work_in_the_sandbox():
    code = "import math, collections, itertools, heapq, functools\ndef add(a, b):\n    return math.floor(a) + b"
    assert code_reward(code, ADD_TESTS) == 1.0


def test_registry_entry():
    example = {"tests": ADD_TESTS, "timeout": 5}
    assert REWARDS["code"]("def add(a, b): return a + b", example) == 1.0


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "fork bomb bypassing the os patch": "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = bytearray(10 ** 12)",
    "growing memory bomb": "xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)",
    "os.system": "import os\nos.system('echo hi > pwned.txt')\ndef add(a, b): return a + b",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\ndef add(a, b): return a + b",
    "sleep": "import time\ntime.sleep(60)",
    "output flood": "import os\nwhile True:\n    os.write(3, b'x' * 65536)",
    "fake result line": "print('{\"passed\": 3}')\nimport os\nos._exit(0)",
    "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "chdir and delete": "import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_is_contained(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env_before, timeout = dict(os.environ), 2.0
    start = time.monotonic()
    assert code_reward(HOSTILE[name], ADD_TESTS, timeout=timeout) == 0.0
    assert time.monotonic() - start < timeout + 3.0
    assert os.listdir(tmp_path) == []  # nothing written to the caller's cwd
    assert dict(os.environ) == env_before


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("NANOR1_SECRET_TOKEN", "hunter2")
    code = "import os\ndef leaked():\n    return 'NANOR1_SECRET_TOKEN' in os.environ or 'HOME' in os.environ"
    assert code_reward(code, ["assert not leaked()"]) == 1.0
    assert code_reward("import os\ndef cwd():\n    return os.listdir('.')", ["assert cwd() == []"]) == 1.0


@settings(max_examples=20, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_code_reward_never_raises(text):
    start = time.monotonic()
    assert code_reward(text, ["assert f() == 1"], timeout=1.0) in (0.0, 1.0)
    assert time.monotonic() - start < 4.0


def test_solutions_are_not_run_as_main_and_may_print_freely():
    """code_reward runs a solution as a module named "solution" (its `if __name__ == "__main__":` block, which reads
    stdin, does not run) and what it prints goes nowhere, however much."""
    main_block = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    a, b = map(int, input().split())"
    assert code_reward(main_block, ADD_TESTS) == 1.0
    assert code_reward("print('x' * 3_000_000)\ndef add(a, b):\n    return a + b", ADD_TESTS) == 1.0


def test_code_cannot_forge_a_setup_failure():
    """A line claiming the sandbox failed to start, written by the code to the harness's report descriptor, does not
    stop a run (only a report before the harness's "ready" line counts)."""
    forged = "import os\nfor fd in range(3, 8):\n    try:\n        os.write(fd, b'\\n{\"setup_error\": \"x\"}\\n')\n" \
             "    except OSError:\n        pass\ndef add(a, b):\n    return a + b"
    assert code_reward(forged, ADD_TESTS) == 1.0
