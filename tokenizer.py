"""Tokenizer and chat templates for nanoR1.

Wraps a HuggingFace `tokenizer.json` (via the `tokenizers` library) and renders the two
chat-template families nanoR1 trains with, in plain Python:

  * ChatML (Qwen2.5 and the project's tiny tokenizer): `<|im_start|>role\\ncontent<|im_end|>\\n`,
    optionally with a default system prompt (Qwen's "You are Qwen, ...") when none is given.
  * DeepSeek-R1-Distill: `<｜begin▁of▁sentence｜>system<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>`,
    which drops everything up to `</think>` from assistant turns.

Why no jinja2: the published templates are Jinja programs, but running them needs jinja2 at run
time and hides what the model actually sees. The non-tool parts of both families are a few lines
of string concatenation, so we re-implement them here and read only the pieces that vary between
published versions (default system prompt, generation prompt) out of the template string.
The tests check every rendering against `transformers.apply_chat_template` token for token.
Tool calls / tool messages are not supported.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

CHATML = "chatml"
DEEPSEEK_R1 = "deepseek-r1"
ROLES = ("system", "user", "assistant")

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
R1_USER, R1_ASSISTANT, R1_EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
THINK_END = "</think>"

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


def _generation_prompt(template: str) -> str:
    """What the template prints inside its last `if add_generation_prompt ... endif` block."""
    start = template.rfind("add_generation_prompt")
    if start < 0:
        return ""
    block = template[start:].split("endif", 1)[0]
    return "".join(_output_literals(block))


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
        """(family, default system prompt, generation prompt), read from the template string."""
        template = self.chat_template
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
        generation_prompt = _generation_prompt(template)
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

    # ---- chat ----
    def _validate(self, messages) -> None:
        if self.chat_format is None:
            raise ValueError(f"no chat_template in {self.config_path}; cannot render a conversation")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i}: expected a dict with 'role' and 'content' keys, got {message!r}")
            if message["role"] not in ROLES:
                raise ValueError(f"message {i}: unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise ValueError(f"message {i}: expected 'content' to be a str, got {type(message['content']).__name__}")
            if message.get("tool_calls"):
                raise ValueError(f"message {i}: tool calls are not supported")

    def _segments(self, messages, add_generation_prompt: bool, keep_final_thinking: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, learned) pieces; learned = assistant content + turn end."""
        self._validate(messages)
        segments = []
        if self.chat_format == CHATML:
            if messages[0]["role"] != "system" and self.default_system_prompt is not None:
                segments.append((f"{IM_START}system\n{self.default_system_prompt}{IM_END}\n", False))
            for message in messages:
                learned = message["role"] == "assistant"
                segments += [(f"{IM_START}{message['role']}\n", False), (message["content"], learned),
                             (IM_END, learned), ("\n", False)]
        else:
            # R1 puts the (last) system message right after bos, whatever its position in the list.
            system = [m["content"] for m in messages if m["role"] == "system"]
            segments.append(((self.bos_token or "") + (system[-1] if system else ""), False))
            for i, message in enumerate(messages):
                if message["role"] == "user":
                    segments.append((R1_USER + message["content"], False))
                elif message["role"] == "assistant":
                    # The template keeps only what follows the last </think> of every assistant
                    # turn (including the final one when there is no generation prompt). Training
                    # on reasoning traces needs the final turn whole: that is what the model generates.
                    final = keep_final_thinking and i == len(messages) - 1
                    content = message["content"] if final else message["content"].split(THINK_END)[-1]
                    segments += [(R1_ASSISTANT, False), (content, True), (R1_EOS, True)]
        if add_generation_prompt:
            segments.append((self.generation_prompt, False))
        return segments

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def encode_chat_with_mask(self, messages, keep_final_thinking: bool = True) -> tuple[list[int], list[int]]:
        """Ids of the whole conversation and a 0/1 mask: 1 on what the model must produce in each
        assistant turn (content + <|im_end|> / <｜end▁of▁sentence｜>), 0 elsewhere.

        keep_final_thinking (R1 template only): keep the `<think>...</think>` of the final assistant
        turn, which the template would drop; SFT on reasoning traces must learn it. With False the ids
        are exactly apply_chat_template(messages, add_generation_prompt=False).

        The ids come from ONE encode of the rendered string; the mask is mapped onto them
        through character offsets. A token that mixes header and content characters (ChatML content
        starting with a newline merges with the header's "\\n") counts as learned.
        """
        segments = self._segments(messages, add_generation_prompt=False, keep_final_thinking=keep_final_thinking)
        learned_chars = bytearray()
        for text, learned in segments:
            learned_chars += bytes([learned]) * len(text)
        encoding = self._tok.encode("".join(text for text, _ in segments), add_special_tokens=False)
        mask = [int(any(learned_chars[start:end])) for start, end in encoding.offsets]
        return encoding.ids, mask

    def __repr__(self) -> str:
        return (f"Tokenizer({self.config_path.parent}, chat_format={self.chat_format}, "
                f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})")
