"""tools.py: the registry and call_tool (every bad call an error result, never an exception), the calculator, the
python tool in the sandbox (hostile code contained, time limit held, nothing left running), and the two call
formats' parsing and answers (ToolUse)."""
import os
import time

import pytest

import tools
from helpers import sandbox_processes
from sandbox import MAX_OUTPUT, isolation, run_python
from tokenizer import Tokenizer
from tools import TOOLS, Call, ToolUse, call_tool, schemas, tool

TINY_TOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny", "tokenizer")
QWEN_TOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizers", "qwen2.5")


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert sandbox_processes() == [], "a tool call left sandbox processes running"


@pytest.mark.parametrize("expression, result", [
    ("2*(3+4)", "14"), ("12-6*11-3", "-57"), ("7/2", "7/2"), ("1.5*2", "3"), ("-(2-5)", "3"), (" 1 + 1 ", "2")])
def test_calculator_is_exact(expression, result):
    assert call_tool("calculator", {"expression": expression}) == (result, None)


@pytest.mark.parametrize("expression, reason", [
    ("1/0", "division by zero"), ("__import__('os')", "bad expression"), ("2**3", "bad expression"),
    ("", "bad expression"), ("(" * 100 + "1" + ")" * 100, "bad expression"), ("9" * 80, "bad expression")])
def test_calculator_refuses_what_it_cannot_compute(expression, reason):
    result, error = call_tool("calculator", {"expression": expression})
    assert error == reason and result.startswith("Error: ")


@pytest.mark.parametrize("name, arguments, reason", [
    ("nope", {}, "unknown tool"),
    ("calculator", {}, "bad arguments"),
    ("calculator", {"expression": "1", "extra": "2"}, "bad arguments"),
    ("calculator", {"expression": 12}, "bad arguments"),
    ("calculator", ["1+1"], "bad arguments"),
    ("calculator", None, "bad arguments"),
])
def test_bad_calls_become_error_results(name, arguments, reason):
    result, error = call_tool(name, arguments)
    assert error == reason and result.startswith("Error: ")


def test_adding_a_tool_is_one_function():
    @tool("Reverse a string.", text="the string")
    def reverse(text, timeout=None):
        if not text:
            raise ValueError("boom")  # a tool's own bug: it stops the run, never a text the model trains on
        return text[::-1]

    try:
        assert schemas(["reverse"])[0]["function"]["parameters"]["required"] == ["text"]
        assert call_tool("reverse", {"text": "abc"}) == ("cba", None)
        with pytest.raises(RuntimeError, match='tool reverse failed on {"text": ""}: ValueError: boom'):
            call_tool("reverse", {"text": ""})
    finally:
        del TOOLS["reverse"]
    with pytest.raises(ValueError, match="unknown tool.*registered: calculator, python"):
        tools.check_names(["reverse"])


def test_the_calls_of_one_step_run_at_once(monkeypatch):
    """ToolUse.run answers a step's calls concurrently: two calls that each wait for the other both return (run one
    after the other, the first would give up at the barrier's timeout and read an error)."""
    import threading
    barrier = threading.Barrier(2, timeout=10)

    @tool("Wait for the other call.", name="who")
    def meet(name, timeout=None):
        barrier.wait()
        return f"met {name}"

    try:
        for affinity in (True, False):  # False: macOS, where os.sched_getaffinity does not exist
            if affinity:
                monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two cores, whatever runs the test
            else:
                monkeypatch.delattr(os, "sched_getaffinity")
                monkeypatch.setattr(os, "cpu_count", lambda: 2)
            calls = [Call("meet", {"name": "a"}), Call("meet", {"name": "b"})]
            ToolUse(Tokenizer.from_pretrained(TINY_TOK), ["meet"], format="chat").run(calls, [0, 0])
            assert [(c.result, c.error) for c in calls] == [("met a", None), ("met b", None)]
    finally:
        del TOOLS["meet"]


def python(code, timeout=2.0):
    return call_tool("python", {"code": code}, timeout=timeout)


def test_python_tool_prints_and_imports():
    assert python("print(2 ** 10)") == ("1024", None)
    assert python("import math, fractions, itertools\nprint(math.comb(5, 2), fractions.Fraction(1, 3))") == \
        ("10 1/3", None)
    assert python("import numpy as np\nprint(int(np.arange(5).sum()))", timeout=10) == ("10", None)
    assert python("import sympy\nprint(sympy.factor('x**2 - 1'))", timeout=20) == ("(x - 1)*(x + 1)", None)
    assert python("import sys\nprint('out'); print('err', file=sys.stderr)") == ("out\nerr", None)
    assert python("import sys\nsys.exit(0)") == ("", None)


@pytest.mark.parametrize("code, reason, says", [
    ("1/0", "ZeroDivisionError", "ZeroDivisionError: division by zero"),
    ("print('a')\nraise ValueError('bad')", "ValueError", "a\nValueError: bad"),
    ("print(", "SyntaxError", "SyntaxError"),
    ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')", "output is not UTF-8", "\ufffd\ufffd ok"),
])
def test_python_errors_are_results_the_model_reads(code, reason, says):
    result, error = python(code)
    assert error == reason and says in result


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timeout"),
    "sleep": ("import time\ntime.sleep(60)", "timeout"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "PermissionError"),
    "fork bomb below os": ("import posix\nwhile True:\n    posix.fork()", "PermissionError"),
    "memory bomb": ("x = bytearray(10 ** 12)", "MemoryError"),
    # filling 1 GiB page by page costs ~0.5 s of CPU time on a quiet machine and has taken over 2 s late in the full
    # suite on 2 cores: the CPU limit or the memory limit stops it first (the next test gives it time to fill one)
    "growing memory bomb": ("xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)", ("MemoryError", "timeout")),
    "subprocess": ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", None),
    "ctypes": ("import ctypes\nctypes.CDLL(None).fork()", None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_is_contained_within_the_time_limit(name):
    code, reason = HOSTILE[name]
    start = time.monotonic()
    result, error = python(code, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 3.0
    assert error is not None and (reason is None or error in (reason if isinstance(reason, tuple) else (reason,))), \
        (result, error)


def test_memory_grown_step_by_step_meets_the_memory_limit():
    """The growing memory bomb under a limit it fills in a fraction of its CPU time (256 MiB, 5 s)."""
    run = run_python("xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)", timeout=5.0, memory_mb=256)
    assert run.error == "MemoryError", run


def test_writes_outside_its_directory_fail(tmp_path):
    target = tmp_path / "pwned.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.mkdir({str(tmp_path / 'd')!r})",
                 "open('/tmp/nanor1-pwned.txt', 'w').write('x')", "import os\nos.chdir('/')\nopen('x', 'w')",
                 "import os\nos.symlink('/etc', 'link')"):
        result, error = python(code)
        assert error is not None, code
    assert os.listdir(tmp_path) == [] and not os.path.exists("/tmp/nanor1-pwned.txt")
    assert python("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())") == ("ok", None)


def test_no_network():
    result, error = python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\nprint('connected')")
    assert error is not None and "connected" not in result
    if os.getuid() == 0:  # as CI runs: the kernel layers hold too
        layers = isolation()
        assert "network namespace" in layers and "user nobody" in layers
        assert any(layer.startswith("private ") and "/dev/shm" in layer for layer in layers)


def test_output_is_cut():
    result, error = python("print('x' * 200000)")
    assert error is None and result.endswith(f"[output cut at {MAX_OUTPUT} bytes]")
    assert len(result) < MAX_OUTPUT + 100


# ---- ToolUse: finding calls in a row's text, answering them


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer.from_pretrained(QWEN_TOK)


def test_chat_calls_parse_every_kind_of_body(qwen):
    use = ToolUse(qwen, ["calculator", "python"])
    segment = ('<think>\nx\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}\n'
               '</tool_call>\n<tool_call>\n{"name": oops}\n</tool_call>\n<tool_call>\n{"arguments": {}}\n</tool_call>'
               '\n<tool_call>\n{"name": "calc')
    calls = use.calls(segment)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "1+2"}, None), ("calculator", {"expression": "2"}, None),
        (None, '{"name": oops}', "malformed call"), (None, '{"arguments": {}}', "malformed call"),
        (None, None, "unclosed call")]
    use.run(calls, [0, 1, 2, 3, 4])
    assert [(c.result, c.error) for c in calls][:2] == [("3", None), ("2", None)]
    assert all(c.result.startswith("Error: ") for c in calls[2:])


def test_chat_limits_and_response(qwen):
    use = ToolUse(qwen, ["calculator"], max_calls=2, max_output_tokens=5)
    calls = [Call("calculator", {"expression": "1+1"}), Call("calculator", {"expression": "2+2"}),
             Call("calculator", {"expression": "10**1"})]
    use.run(calls, [1, 2, 3])
    assert [c.error for c in calls] == [None, "too many calls", "too many calls"]
    assert use.respond("", calls[:1]) == "\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n" \
                                         "<|im_start|>assistant\n"
    long = Call("python", {"code": "print('word ' * 50)"})
    use = ToolUse(qwen, ["python"], max_output_tokens=5)
    use.run([long], [0])
    assert long.result.startswith("word word word word word") and "[output cut: 51 tokens, the first 5 shown]" in \
        long.result


def test_code_format_finds_the_block_and_answers_with_output(qwen):
    use = ToolUse(qwen, ["python"], format="code")
    assert use.calls("Let me compute.\n```python\nprint(6*7)\n") == []
    calls = use.calls("Let me compute.\n```python\nprint(6*7)\n```")
    assert [(c.name, c.arguments) for c in calls] == [("python", {"code": "print(6*7)\n"})]
    use.run(calls, [0])
    assert use.respond("...```", calls) == "\n```output\n42\n```\n"
    assert use.respond("...```\n", calls) == "```output\n42\n```\n"
    assert use.unclosed("```python\nprint(1") .record() == dict(name="python", arguments={"code": "print(1"},
                                                                result=None, error="unclosed call")
    assert use.unclosed("no call here") is None
    assert use.may_close(qwen.encode("```")[0]) and not use.may_close(qwen.encode("x")[0])


def test_a_template_without_tools_cannot_use_the_chat_format():
    r1 = Tokenizer.from_pretrained(os.path.join(os.path.dirname(QWEN_TOK), "deepseek-r1-distill-qwen"))
    with pytest.raises(ValueError, match="has no tool calls"):
        ToolUse(r1, ["python"], format="chat")
    ToolUse(r1, ["python"], format="code")  # fences work under any template
    with pytest.raises(ValueError, match="unknown tool"):
        ToolUse(r1, ["shell"], format="code")


def test_python_runs_are_reproducible():
    code = "import random\nprint(hash('nanoR1'), random.random(), set('abcdefgh'))"
    assert python(code) == python(code) and python(code)[1] is None


def test_model_output_nested_past_the_recursion_limit_is_a_malformed_call(qwen):
    use = ToolUse(qwen, ["calculator"])
    deep = '<tool_call>\n{"name": "calculator", "arguments": ' + "[" * 5000 + "\n</tool_call>"
    assert [(c.name, c.error) for c in use.calls(deep)] == [(None, "malformed call")]


def test_the_code_format_takes_the_python_tool_alone(qwen):
    with pytest.raises(ValueError, match="takes the python tool alone"):
        ToolUse(qwen, ["calculator"], format="code")
    with pytest.raises(ValueError, match="takes the python tool alone"):
        tools.tool_use(qwen, "calculator", "auto", "r1zero")  # auto picks code outside a chat template
    assert tools.tool_use(qwen, "calculator", "auto", "chat").format == "chat"
    with pytest.raises(ValueError, match="must be > 0"):
        ToolUse(qwen, ["python"], format="code", timeout=0)


def test_each_call_runs_in_a_fresh_copy_of_the_warm_server():
    """A call runs in a copy forked from the server started before it (sandbox.SERVER), which is then gone: the next
    call gets another copy, nothing one call leaves in its process reaches the next, and the server runs no call."""
    import sandbox
    sandbox.SERVER.start()
    server = sandbox.SERVER.proc.pid
    result, error = python("import os, math\nmath.left_behind = 1\nprint(os.getpid(), os.getppid())")
    pid, parent = map(int, result.split())
    assert error is None and parent == server and pid != server
    result, error = python("import os, math\nprint(os.getpid(), hasattr(math, 'left_behind'))")
    second, left_behind = result.split()
    assert error is None and int(second) not in (pid, server) and left_behind == "False"
    assert sandbox.SERVER.proc.pid == server and sandbox_processes() == []


def test_a_broken_sandbox_stops_the_run(monkeypatch):
    """What is not the model's doing must not become a tool result it trains on."""
    import sandbox
    sandbox.SERVER.stop()
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python3")
    with pytest.raises(RuntimeError, match="tool python failed .*cannot start /nonexistent/python3"):
        python("print(1)")


def test_an_interpreter_that_cannot_run_the_harness_stops_the_run(monkeypatch):
    import sandbox
    sandbox.SERVER.stop()
    monkeypatch.setattr(sandbox, "_HARNESS", "raise SystemExit('no harness here')")
    with pytest.raises(RuntimeError, match="tool python failed .*exited with status 1 before .*no harness here"):
        python("print(1)")
    sandbox.SERVER.stop()


def test_a_server_killed_between_calls_is_started_again():
    import sandbox
    sandbox.SERVER.start()
    os.killpg(sandbox.SERVER.proc.pid, 9)
    sandbox.SERVER.proc.wait()
    assert python("print(3)") == ("3", None)


def test_a_call_sees_no_other_calls_payload(monkeypatch):
    """The server never holds a payload (each copy reads its own from a file, then removes it): a call that walks up
    its frames (the audit hook allows sys._getframe) finds no other call's code, made just before or running beside
    it."""
    import concurrent.futures
    secret = "print('SECRET' + '_OF_B')\nimport time\ntime.sleep(1.5)\n# SECRET_OF_B_42"
    scan = ("import sys\nf, seen = sys._getframe(), set()\nwhile f is not None:\n"
            "    seen.update(repr(v) for v in f.f_locals.values())\n    f = f.f_back\n"
            "print(any(('SECRET_OF_B' + '_42') in s for s in seen))")
    import sandbox
    sent, send = [], sandbox._Server.send
    monkeypatch.setattr(sandbox._Server, "send", lambda self, request: sent.append(repr(request)) or send(self, request))
    assert python(secret) == ("SECRET_OF_B", None)
    assert sent and not any("SECRET" in r for r in sent)  # the server got a directory, never the code
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        beside = pool.submit(python, secret)
        time.sleep(0.2)
        assert python(scan) == ("False", None)
        assert beside.result() == ("SECRET_OF_B", None)


def test_stopping_the_server_mid_call_ends_the_call_and_its_copy():
    """A call whose server goes away does not wait out its wall limit, nor leave its copy running: it raises."""
    import concurrent.futures

    import sandbox
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sleeping = pool.submit(python, "import time\ntime.sleep(60)", 50.0)
        time.sleep(0.5)
        t0 = time.time()
        sandbox.SERVER.stop()
        with pytest.raises(RuntimeError, match="fork server ended during a call"):
            sleeping.result(timeout=20)
    assert time.time() - t0 < 10 and sandbox_processes() == []


def test_a_forked_child_does_not_hold_the_server():
    """A process forked while the server runs (a DataLoader worker, a fork-started pool) keeps nothing of it: while
    it lives, the parent's calls still end, and the child's own call gets a server of its own."""
    import sandbox
    sandbox.SERVER.start()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one call of its own, then wait until the parent is done
        try:
            os.close(read)
            answer = python("print(5)")
            own = sandbox.SERVER.proc.pid
            sandbox.SERVER.stop()  # the child's own server (its parent's is not its to stop)
            os.write(write, b"ok" if answer == ("5", None) else b"no")
            os.write(write, own.to_bytes(4, "little"))
            time.sleep(10)
        finally:
            os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 2) == b"ok"
        assert int.from_bytes(os.read(read, 4), "little") != sandbox.SERVER.proc.pid
        t0 = time.time()
        assert python("print(1)", timeout=3.0) == ("1", None) and time.time() - t0 < 2.0
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)


def test_a_torchrun_exit_leaves_no_interpreter_nor_directory(tmp_path):
    """train_common.exit_if_torchrun leaves by os._exit, which runs no atexit handler: it stops the server itself."""
    import subprocess
    import sys
    script = ("import os, tempfile, sandbox, train_common\n"
              "print(sandbox.SERVER.start().root, flush=True)\n"
              "train_common.exit_if_torchrun(0)\n")
    env = {**os.environ, "RANK": "0", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    roots = out.stdout.split()
    assert out.returncode == 0 and len(roots) == 1, out.stderr[-2000:]
    assert not any(os.path.exists(r) for r in roots) and sandbox_processes() == []
