"""Tokenizer and chat templates for nanoR1.

Wraps a HuggingFace `tokenizer.json` (via the `tokenizers` library) and renders the chat-template families nanoR1
trains with, in plain Python:

  * ChatML (Qwen2.5, Qwen3 and the project's tiny tokenizer): `<|im_start|>role\\ncontent<|im_end|>\\n`, with what
    the published templates add: Qwen2.5's default system prompt ("You are Qwen, ...") when none is given; tools
    (their JSON schemas in the system turn, `<tool_call>` JSON in assistant turns, consecutive `tool` messages in
    one turn of `<tool_response>` blocks); Qwen3's thinking (`enable_thinking`, reasoning kept only in the
    assistant turns after the last user query).
  * DeepSeek-R1-Distill: `<｜begin▁of▁sentence｜>system<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>`,
    which drops everything up to `</think>` from assistant turns. No tools.

Why no jinja2: the published templates are Jinja programs, but running them needs jinja2 at run time and hides
what the model actually sees. Each family is a few lines of string concatenation, so we re-implement them here and
read only the pieces that vary between published versions (default system prompt, generation prompt, the tools
preamble, whether thinking is handled) out of the template string. The tests check every rendering against
`transformers.apply_chat_template` token for token.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

CHATML = "chatml"
DEEPSEEK_R1 = "deepseek-r1"
ROLES = ("system", "user", "assistant", "tool")

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
R1_USER, R1_ASSISTANT, R1_EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

# Jinja output expressions `{{ ... }}` and the quoted string literals inside them.
_JINJA_EXPRESSION = re.compile(r"\{\{(.*?)\}\}", re.S)
_STRING_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n?", re.S)


def _output_literals(template: str) -> list[str]:
    """The string literals the template prints, unescaped (`'a\\nb'` -> "a<newline>b")."""
    literals = []
    for expression in _JINJA_EXPRESSION.findall(template):
        for single, double in _STRING_LITERAL.findall(expression):
            raw = single or double
            literals.append(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), raw, flags=re.S))
    return literals


def _generation_prompt(template: str) -> tuple[str, str]:
    """What the template prints inside its last `if add_generation_prompt ... endif` block: (always, and what Qwen3's
    template adds only when `enable_thinking` is false: an empty think block)."""
    start = template.rfind("add_generation_prompt")
    if start < 0:
        return "", ""
    block = template[start:]
    if "enable_thinking" not in block:
        return "".join(_output_literals(block.split("endif", 1)[0])), ""
    always, thinking = block.split("enable_thinking", 1)
    return "".join(_output_literals(always)), "".join(_output_literals(thinking.split("endif", 1)[0]))


def _tools_preamble(template: str) -> tuple[str, str] | None:
    """The text around the tool schemas in the system turn ("# Tools ... <tools>", "</tools> ... <|im_end|>\\n"),
    read from the template's literals; None for a template without tools."""
    literals = _output_literals(template)
    before = next((s for s in literals if s.endswith("<tools>")), None)
    after = next((s for s in literals if s.startswith("\n</tools>")), None)
    return (before, after) if before is not None and after is not None else None


def _tojson(value) -> str:
    """Jinja's `tojson` as transformers defines it for chat templates: json.dumps without ASCII escaping."""
    return json.dumps(value, ensure_ascii=False)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"malformed {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_string(value) -> str | None:
    """tokenizer_config.json stores special tokens as "str" or as {"content": "str", ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _RustTokenizer, config: dict, config_path: Path, generation_config: dict | None = None):
        self._tok = tokenizer
        self.config_path = config_path
        self.bos_token = _token_string(config.get("bos_token"))
        self.eos_token = _token_string(config.get("eos_token"))
        pad_token = _token_string(config.get("pad_token"))

        gen_eos = (generation_config or {}).get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is None and gen_eos_ids:
            eos_id = gen_eos_ids[0]  # no eos in tokenizer_config.json: trust generation_config.json
        if eos_id is None:
            raise ValueError(f"{config_path}: no eos_token that exists in the vocabulary ({self.eos_token!r})")
        self.eos_id: int = eos_id
        self.bos_id: int | None = self.token_to_id(self.bos_token) if self.bos_token else None
        pad_id = self.token_to_id(pad_token) if pad_token else None
        self.pad_id: int = eos_id if pad_id is None else pad_id
        # Every token that ends a turn or a document stops generation, not just the declared eos:
        # e.g. Qwen2.5 base models end documents with <|endoftext|> while eos is <|im_end|>.
        turn_enders = (self.token_to_id(t) for t in (IM_END, ENDOFTEXT, R1_EOS))
        self.stop_ids: set[int] = {eos_id, *gen_eos_ids} | {i for i in turn_enders if i is not None}

        self.chat_template = config.get("chat_template")
        self.chat_format, self.default_system_prompt, self.generation_prompt = self._detect_chat_format()

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load from a folder holding tokenizer.json, tokenizer_config.json [, generation_config.json]."""
        path = Path(path)
        tokenizer_file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
        for required in (tokenizer_file, config_file):
            if not required.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {required}")
        try:
            tokenizer = _RustTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception on bad files
            raise ValueError(f"could not load {tokenizer_file}: {e}") from e
        config = _read_json(config_file)
        template = config.get("chat_template")
        if isinstance(template, list):  # some configs store named templates: [{"name", "template"}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            config["chat_template"] = named.get("default")
        jinja_file = path / "chat_template.jinja"  # where transformers >= 4.43 saves it instead
        if not config.get("chat_template") and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        generation_file = path / "generation_config.json"
        generation_config = _read_json(generation_file) if generation_file.is_file() else None
        return cls(tokenizer, config, config_file, generation_config)

    def _detect_chat_format(self) -> tuple[str | None, str | None, str]:
        """(family, default system prompt, generation prompt), read from the template string; also sets the tool and
        thinking features the template has (tools_preamble, thinking, no_thinking_prompt, raw_string_arguments)."""
        template = self.chat_template
        self.tools_preamble, self.thinking, self.no_thinking_prompt, self.raw_string_arguments = None, False, "", False
        if not template:
            return None, None, ""  # plain encoder (e.g. a base model); chat methods will refuse
        if IM_START in template:
            family, header = CHATML, f"{IM_START}assistant\n"
        elif R1_USER in template and R1_ASSISTANT in template:
            family, header = DEEPSEEK_R1, R1_ASSISTANT
        else:
            raise ValueError(
                f"unsupported chat_template in {self.config_path}: supported families are ChatML "
                f"(contains {IM_START!r}) and DeepSeek-R1 (contains {R1_USER!r} and {R1_ASSISTANT!r})"
            )
        # The generation prompt differs between published versions (R1: "<｜Assistant｜>" vs
        # "<｜Assistant｜><think>\n"), so take it from the template instead of assuming one.
        generation_prompt, self.no_thinking_prompt = _generation_prompt(template)
        if not generation_prompt.startswith(header):
            raise ValueError(
                f"unsupported {family} chat_template variant in {self.config_path}: expected its "
                f"add_generation_prompt block to print {header!r}..., found {generation_prompt!r}"
            )
        default_system = None
        if family == CHATML:  # Qwen-style templates print a whole default system turn as one literal
            for literal in _output_literals(template):
                match = _CHATML_DEFAULT_SYSTEM.fullmatch(literal)
                if match:
                    default_system = match.group(1)
                    break
            self.tools_preamble = _tools_preamble(template)
            if "tool_call" in template and self.tools_preamble is None:
                raise ValueError(f"unsupported ChatML tools variant in {self.config_path}: no '...<tools>' and "
                                 "'\\n</tools>...' literals around the tool schemas")
            self.thinking = "reasoning_content" in template  # Qwen3: reasoning kept after the last query only
            self.raw_string_arguments = "arguments is string" in template  # Qwen3 prints string arguments as is
        return family, default_system, generation_prompt

    # ---- plain text ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no bos is prepended, but special-token strings inside the
        # text (e.g. "<|im_end|>") still become their single special ids, as in transformers.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def ids_containing(self, text: str) -> set[int]:
        """Every id whose token contains `text` (byte-level tokens show printable ASCII as itself)."""
        return {i for token, i in self._tok.get_vocab(with_added_tokens=True).items() if text in token}

    # ---- chat ----
    def check_tools(self) -> None:
        """Raise ValueError unless this chat template renders tool calls."""
        if self.chat_format is None:
            raise ValueError(f"no chat_template in {self.config_path}; cannot render a conversation")
        if self.tools_preamble is None:
            raise ValueError(f"the chat template of {self.config_path} ({self.chat_format}) has no tool calls; "
                             "use a template that has them (Qwen2.5, Qwen3) or the code tool format")

    def _validate(self, messages, tools) -> None:
        if self.chat_format is None:
            raise ValueError(f"no chat_template in {self.config_path}; cannot render a conversation")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        uses_tools = bool(tools)
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i}: expected a dict with 'role' and 'content' keys, got {message!r}")
            if message["role"] not in ROLES:
                raise ValueError(f"message {i}: unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")
            calls = message.get("tool_calls")
            if not isinstance(message["content"], str) and not (calls and message["content"] is None):
                raise ValueError(f"message {i}: expected 'content' to be a str, got {type(message['content']).__name__}")
            if calls:
                if message["role"] != "assistant" or not isinstance(calls, (list, tuple)):
                    raise ValueError(f"message {i}: 'tool_calls' must be a list, on an assistant message")
                for call in calls:
                    call = call.get("function", call) if isinstance(call, Mapping) else call
                    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or "arguments" not in call:
                        raise ValueError(f"message {i}: a tool call needs 'name' (a str) and 'arguments', got {call!r}")
            uses_tools = uses_tools or bool(calls) or message["role"] == "tool"
        if uses_tools:
            self.check_tools()

    def _segments(self, messages, add_generation_prompt: bool, keep_final_thinking: bool = False, tools=None,
                  enable_thinking: bool = True) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, learned) pieces; learned = what the model writes in an assistant turn
        (its content, its tool calls and the turn's end)."""
        self._validate(messages, tools)
        if self.chat_format == DEEPSEEK_R1:
            segments = self._r1_segments(messages, keep_final_thinking)
        else:
            segments = self._chatml_system(messages, tools)
            last_query = self._last_query(messages) if self.thinking else None
            for i, message in enumerate(messages):
                role = message["role"]
                if role == "assistant":
                    segments += self._chatml_assistant(message, i == len(messages) - 1,
                                                       last_query is not None and i > last_query)
                elif role == "tool":
                    opens = i == 0 or messages[i - 1]["role"] != "tool"
                    closes = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                    segments.append((self._tool_result(message["content"], opens, closes), False))
                elif i > 0 or role != "system":  # the first system message is in the system turn
                    segments.append((f"{IM_START}{role}\n{message['content']}{IM_END}\n", False))
        if add_generation_prompt:
            segments.append((self._assistant_opening(enable_thinking), False))
        return segments

    def _assistant_opening(self, enable_thinking):
        """The generation prompt, and with thinking off the empty think block Qwen3's template adds to it."""
        return self.generation_prompt + ("" if enable_thinking else self.no_thinking_prompt)

    def _r1_segments(self, messages, keep_final_thinking):
        # R1 puts the (last) system message right after bos, whatever its position in the list.
        system = [m["content"] for m in messages if m["role"] == "system"]
        segments = [((self.bos_token or "") + (system[-1] if system else ""), False)]
        for i, message in enumerate(messages):
            if message["role"] == "user":
                segments.append((R1_USER + message["content"], False))
            elif message["role"] == "assistant":
                # The template keeps only what follows the last </think> of every assistant turn (including the
                # final one when there is no generation prompt). Training on reasoning traces needs the final turn
                # whole: that is what the model generates.
                final = keep_final_thinking and i == len(messages) - 1
                content = message["content"] if final else message["content"].split(THINK_END)[-1]
                segments += [(R1_ASSISTANT, False), (content, True), (R1_EOS, True)]
        return segments

    def _chatml_system(self, messages, tools):
        """The system turn: the first system message (else the template's default system prompt, if it has one), and
        with tools their schemas between the template's preamble and postamble."""
        system = messages[0]["content"] if messages[0]["role"] == "system" else self.default_system_prompt
        if tools:
            before, after = self.tools_preamble
            schemas = "".join("\n" + _tojson(tool) for tool in tools)
            # Qwen2.5's preamble starts with the blank line after the system text; Qwen3 adds it after the text
            prefix = "" if system is None else system + ("" if before.startswith("\n\n") else "\n\n")
            return [(f"{IM_START}system\n{prefix}{before}{schemas}{after}", False)]
        return [] if system is None else [(f"{IM_START}system\n{system}{IM_END}\n", False)]

    @staticmethod
    def _last_query(messages):
        """Qwen3: the index of the last user message that is not tool output wrapped as one; the template keeps the
        reasoning of the assistant turns after it only."""
        for i in range(len(messages) - 1, -1, -1):
            content = messages[i]["content"]
            if messages[i]["role"] == "user" and not (content.startswith(TOOL_RESPONSE)
                                                      and content.endswith(TOOL_RESPONSE_END)):
                return i
        return len(messages) - 1

    def _chatml_assistant(self, message, last, after_query):
        content, reasoning = message["content"] or "", ""
        text = content
        if self.thinking:  # Qwen3: split the reasoning off, and keep it only where the template keeps it
            if message.get("reasoning_content") is not None:
                reasoning = message["reasoning_content"]
            elif THINK_END in content:
                reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
                content = text = content.split(THINK_END)[-1].lstrip("\n")
            if after_query and (last or reasoning):
                text = f"{THINK_START}\n{reasoning.strip(chr(10))}\n{THINK_END}\n\n{content.lstrip(chr(10))}"
        for j, call in enumerate(message.get("tool_calls") or ()):
            call = call.get("function", call)
            args = call["arguments"]
            args = args if isinstance(args, str) and self.raw_string_arguments else _tojson(args)
            text += ("\n" if j or content else "") + \
                f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>'
        return [(f"{IM_START}assistant\n", False), (text, True), (IM_END, True), ("\n", False)]

    @staticmethod
    def _tool_result(content, opens, closes):
        """One tool message: a <tool_response> block inside the user turn that holds a run of consecutive tool
        messages (opened by the first of them, closed by the last)."""
        return (f"{IM_START}user" if opens else "") + f"\n{TOOL_RESPONSE}\n{content}\n{TOOL_RESPONSE_END}" + \
            (f"{IM_END}\n" if closes else "")

    def tool_turn(self, results, enable_thinking: bool = True) -> str:
        """What follows an assistant turn that ended in tool calls (after its <|im_end|>): the turn's newline, one
        tool turn holding `results`, and the next assistant header, exactly as the template renders them."""
        self.check_tools()
        turn = "".join(self._tool_result(r, i == 0, i == len(results) - 1) for i, r in enumerate(results))
        return "\n" + turn + self._assistant_opening(enable_thinking)

    def render_chat(self, messages, add_generation_prompt: bool = False, tools=None, enable_thinking: bool = True) -> str:
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt, tools=tools,
                                                          enable_thinking=enable_thinking))

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> list[int]:
        """Token ids of the conversation, as transformers' apply_chat_template(..., tokenize=True) gives them.
        tools: JSON schemas (tools.schemas(names)); enable_thinking=False: Qwen3's empty think block."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, enable_thinking))

    def encode_chat_with_mask(self, messages, keep_final_thinking: bool = True, tools=None) -> tuple[list[int], list[int]]:
        """Ids of the whole conversation and a 0/1 mask: 1 on what the model must produce in each
        assistant turn (content, tool calls and <|im_end|> / <｜end▁of▁sentence｜>), 0 elsewhere (headers,
        system and user turns, tool results).

        keep_final_thinking (R1 template only): keep the `<think>...</think>` of the final assistant
        turn, which the template would drop; SFT on reasoning traces must learn it. With False the ids
        are exactly apply_chat_template(messages, tools, add_generation_prompt=False).

        The ids come from ONE encode of the rendered string; the mask is mapped onto them
        through character offsets. A token that mixes header and content characters (ChatML content
        starting with a newline merges with the header's "\\n") counts as learned.
        """
        segments = self._segments(messages, add_generation_prompt=False, keep_final_thinking=keep_final_thinking,
                                  tools=tools)
        learned_chars = bytearray()
        for text, learned in segments:
            learned_chars += bytes([learned]) * len(text)
        encoding = self._tok.encode("".join(text for text, _ in segments), add_special_tokens=False)
        mask = [int(any(learned_chars[start:end])) for start, end in encoding.offsets]
        return encoding.ids, mask

    def __repr__(self) -> str:
        return (f"Tokenizer({self.config_path.parent}, chat_format={self.chat_format}, "
                f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})")
