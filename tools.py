"""
Tools a model calls while it generates (tool-integrated reasoning), and the two ways it calls them.

A tool is one function registered with @tool; everything else calls it through call_tool:

    @tool("Evaluate an arithmetic expression exactly.", expression="the expression, e.g. (3+4)*12/5")
    def calculator(expression):
        ...
    result, error = call_tool("calculator", {"expression": "2*(3+4)"}, timeout=5)   # ("14", None)

A bad call never raises: malformed arguments, an unknown tool, the code's own exception, a timeout, output that is not
UTF-8 all come back as (text the model reads, a short reason), and the reason is what the metrics count. What is not
the model's doing stops the run instead: a sandbox that cannot start, or a bug in a tool (any exception but ToolError);
the model must never train on the text of a broken harness.
A tool's text is tokenized as the chat template's rendering is: a special token's string in it (`<|im_end|>`) becomes
that token, as it does in transformers' apply_chat_template.

The call formats (ToolUse.format), one mechanism behind both (engine.Engine.generate(..., tools=ToolUse(...))):
  chat: Qwen's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; the calls end the assistant turn
        (`<|im_end|>`), every call of the turn runs, and the results come back as one `tool` turn followed by the
        next assistant header, exactly as the tokenizer's chat template renders them (tokenizer.tool_turn).
  code: a fenced ```python block, answered by a fenced ```output block right after it (ToRL, arXiv 2503.23383,
        sec. 2.1); works under any prompt template. Recorded as {name: "python", arguments: {"code": SOURCE}}.
"""
import concurrent.futures
import json
import os
import re
from dataclasses import dataclass

from reward import evaluate_arithmetic
from sandbox import SERVER, isolation, run_python

TOOL_FORMATS = ("chat", "code")


@dataclass
class Tool:
    fn: object  # fn(**arguments, timeout=seconds) -> the text the model reads; raises ToolError for a bad call
    schema: dict  # the JSON schema a chat template shows the model (OpenAI function format)


class ToolError(Exception):
    """A call that failed: the model reads "Error: MESSAGE" (or, with verbatim, MESSAGE as it is: a program's own
    output and traceback); `reason` (default: the message) is what the metrics count."""

    def __init__(self, message, reason=None, verbatim=False):
        super().__init__(message)
        self.reason, self.verbatim = reason or message, verbatim


TOOLS: dict[str, Tool] = {}


def tool(description, **params):
    """Register the decorated function as a tool. params: argument name -> its description (every argument is a
    required string)."""
    def register(fn):
        properties = {name: {"type": "string", "description": text} for name, text in params.items()}
        TOOLS[fn.__name__] = Tool(fn, {"type": "function", "function": {
            "name": fn.__name__, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)}}})
        return fn
    return register


def schemas(names):
    """The JSON schemas of the named tools, for apply_chat_template(tools=...)."""
    return [TOOLS[name].schema for name in names]


def check_names(names):
    """Raise ValueError naming the registry if any name is not a tool."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; registered: {', '.join(TOOLS)}")


def call_tool(name, arguments, timeout=5.0):
    """Run one call. -> (result, error): result is the text the model reads, error None or a short reason."""
    if name not in TOOLS:
        return f"Error: unknown tool {name!r}; the tools are {', '.join(TOOLS)}.", "unknown tool"
    params = TOOLS[name].schema["function"]["parameters"]["properties"]
    if not isinstance(arguments, dict) or set(arguments) != set(params) or \
            not all(isinstance(v, str) for v in arguments.values()):
        return f"Error: {name} takes the string argument(s) {', '.join(params)}.", "bad arguments"
    try:
        return str(TOOLS[name].fn(**arguments, timeout=timeout)), None
    except ToolError as e:
        return (str(e) if e.verbatim else f"Error: {e}"), e.reason
    except Exception as e:  # the harness, not the model: never a result to train on
        raise RuntimeError(f"tool {name} failed on {json.dumps(arguments)[:200]}: {type(e).__name__}: {e}") from e


def rank_cores():
    """The cores this rank may use: those it may run on (all the machine's where the OS does not say, as on
    macOS), shared among the torchrun ranks of its node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


# -----------------------------------------------------------------------------
# the tools


@tool("Evaluate an arithmetic expression exactly: numbers, + - * / and parentheses.",
      expression="the expression, e.g. (3+4)*12/5")
def calculator(expression, timeout=None):
    try:
        value = evaluate_arithmetic(expression)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except ValueError as e:
        raise ToolError(f"not an arithmetic expression ({e})", "bad expression") from None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


@tool("Run Python code and return what it prints (stdout and stderr). math, fractions and itertools import; numpy "
      "and sympy where installed.", code="the Python source")
def python(code, timeout=5.0):
    run = run_python(code, timeout=timeout)
    try:
        text = run.output.decode("utf-8")
    except UnicodeDecodeError:
        text = run.output.decode("utf-8", "replace")
        if run.error is None:
            raise ToolError(text, "output is not UTF-8") from None
    if run.truncated:
        text += f"\n[output cut at {len(run.output)} bytes]"
    if run.error == "timeout":
        raise ToolError(f"{text}\nTimeoutError: the code ran for more than {timeout} s".lstrip("\n"), "timeout",
                        verbatim=True)
    if run.error is not None:  # what it printed, then the exception's last lines, as a terminal shows them
        raise ToolError(text.rstrip("\n"), run.error, verbatim=True)
    return text.rstrip("\n")


# -----------------------------------------------------------------------------
# calls inside a generation

_CHAT_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_CODE_OPEN = re.compile(r"```(?i:python3?|py)[ \t]*\n")  # the fence tags reward._extract_code takes
_CODE_CALL = re.compile(_CODE_OPEN.pattern + r"(.*?)```", re.S)


@dataclass
class Call:
    name: str | None
    arguments: object
    result: str | None = None
    error: str | None = None

    def record(self):
        return dict(name=self.name, arguments=self.arguments, result=self.result, error=self.error)


def _open_chat_call(segment):
    """The text from a `<tool_call>` the segment opened after its last `</tool_call>` and never closed, else None."""
    tail = segment.rsplit("</tool_call>", 1)[-1]
    return tail[tail.find("<tool_call>"):] if "<tool_call>" in tail else None


def tool_use(tok, names, format="auto", template="chat", max_calls=4, max_output_tokens=256, timeout=5.0,
             in_prompt=True):
    """The ToolUse the command-line values ask for (the scripts' --tools, --tool_format, ...), or None for no tools.
    names: a list or "a,b"; format auto: chat under a chat template that has tool calls, else code."""
    names = [n for n in names.split(",") if n] if isinstance(names, str) else list(names)
    if not names:
        return None
    if format == "auto":
        format = "chat" if template == "chat" and tok.tools_preamble is not None else "code"
    return ToolUse(tok, names, format, max_calls, max_output_tokens, timeout, in_prompt=in_prompt)


class ToolUse:
    """How an Engine runs tools inside a generation: which tools, in which format, within which limits.

    The Engine feeds it the text a row wrote since the last result (its segment) and asks calls() whether that text
    just completed a call; respond() turns the answered calls into the text forced into the row.
    in_prompt (chat format): the prompts list the tools' JSON schemas in the system turn, as the chat template does;
    False for a model that learned its tools in SFT without them (the tiny world: they are ~500 tiny tokens)."""

    def __init__(self, tok, names, format="chat", max_calls=4, max_output_tokens=256, timeout=5.0, in_prompt=True):
        check_names(names)
        if format not in TOOL_FORMATS:
            raise ValueError(f"tool format {format!r}: expected one of {', '.join(TOOL_FORMATS)}")
        if format == "code" and list(names) != ["python"]:
            raise ValueError(f"the code format runs ```python blocks: it takes the python tool alone, not "
                             f"{', '.join(names)} (use the chat format under a chat template that has tool calls)")
        if timeout <= 0 or max_calls < 1 or max_output_tokens < 1:
            raise ValueError(f"timeout {timeout}, max_calls {max_calls}, max_output_tokens {max_output_tokens}: "
                             "each must be > 0")
        if format == "chat":
            tok.check_tools()  # a template family without tools says so here
        self.tok, self.names, self.format = tok, list(names), format
        self.max_calls, self.max_output_tokens, self.timeout = max_calls, max_output_tokens, timeout
        self.schemas = schemas(names) if format == "chat" and in_prompt else None  # the prompt's system turn lists
        # the tokens after which a call may be complete: the turn's end (chat), any with a backtick (code)
        self.closers = {tok.token_to_id("<|im_end|>")} if format == "chat" else tok.ids_containing("`")
        self.workers = rank_cores()  # calls that run at once: each runs a process (the python tool's is CPU-bound)
        self._pool = None  # the threads calls run on (start), made at the first call
        if "python" in names:  # the sandbox's interpreter ready before the first call
            SERVER.start()

    def describe(self):
        """One line for a run's log: the tools, the format, the limits, and what isolates the python tool."""
        line = f"{', '.join(self.names)} in the {self.format} format, at most {self.max_calls} calls a completion"
        if "python" in self.names:
            layers = ", ".join(isolation()) or "no namespace could be made: only the audit hook closes the network"
            line += f"; python sandbox: {layers}"
        return line

    def may_close(self, token):
        """Whether a row that just sampled `token` may have completed a call (then calls() looks)."""
        return token in self.closers

    def calls(self, segment):
        """The calls the segment (a row's text since the last result) has just completed, or [] for none yet."""
        if self.format == "code":
            m = _CODE_CALL.search(segment)
            return [Call("python", {"code": m.group(1)})] if m else []
        calls = [self._parse_chat(body) for body in _CHAT_CALL.findall(segment)]
        if _open_chat_call(segment) is not None:
            calls.append(Call(None, None, error="unclosed call"))
        return calls

    @staticmethod
    def _parse_chat(body):
        try:  # any model output: malformed JSON, the wrong shape, JSON nested past the recursion limit, ...
            call = json.loads(body)
            args = call["arguments"]
            args = json.loads(args) if isinstance(args, str) else args
            if not isinstance(call["name"], str):
                raise TypeError
            json.dumps(args)  # (the call is logged as JSON later)
            return Call(call["name"], args)
        except Exception:
            return Call(None, body.strip(), error="malformed call")

    def unclosed(self, segment):
        """A call the row opened but never closed (it ran out of tokens), as an error record; else None."""
        if self.format == "code":
            opened = list(_CODE_OPEN.finditer(segment))
            return Call("python", {"code": segment[opened[-1].end():]}, error="unclosed call") if opened else None
        opened = _open_chat_call(segment)
        return Call(None, opened, error="unclosed call") if opened is not None else None

    def start(self, calls, made_before):
        """Start answering calls, in place, in the background. -> a future per call (.result() raises what the call
        raised: a broken sandbox stops the run). made_before[i]: how many calls call i's completion made before it
        (past max_calls: an error result). `workers` threads run them (the python tool waits on its process there);
        the Engine lets the other rows decode meanwhile."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="tool")
        return [self._pool.submit(self._answer, call, n) for call, n in zip(calls, made_before)]

    def run(self, calls, made_before):
        """start() and wait for every answer."""
        for future in self.start(calls, made_before):
            future.result()

    def _answer(self, call, made_before):
        if call.error is not None:  # malformed or unclosed: the model reads what was wrong with it
            call.result = f"Error: {call.error}" + (f": {call.arguments}" if call.arguments else ".")
        elif made_before >= self.max_calls:
            call.result, call.error = f"Error: at most {self.max_calls} tool calls.", "too many calls"
        else:
            call.result, call.error = call_tool(call.name, call.arguments, self.timeout)
        call.result = self._cut(call.result)

    def _cut(self, text):
        ids = self.tok.encode(text)
        if len(ids) <= self.max_output_tokens:
            return text
        kept = self.tok.decode(ids[:self.max_output_tokens]).rstrip("\ufffd")
        return f"{kept}\n[output cut: {len(ids)} tokens, the first {self.max_output_tokens} shown]"

    def respond(self, segment, calls):
        """The text forced into the row after its answered calls: the tool turn and the next assistant header
        (chat), or the output block (code)."""
        if self.format == "chat":
            return self.tok.tool_turn([c.result for c in calls])
        return ("" if segment.endswith("\n") else "\n") + f"```output\n{calls[0].result}\n```\n"
