"""Write the embedded world: the tiny arithmetic task's splits, cold-start set, pretraining corpus
and tokenizer. Seeded and deterministic; the default output is committed under data/tiny/.

    python data/prepare_tiny.py                      # -> data/tiny/ (a few seconds)
    python data/prepare_tiny.py --max_ops=6 --out_dir=/tmp/hard

Files (see data/tiny/README.md):
  test.jsonl       held-out RL/eval prompts  {"prompt", "messages", "answer"}
  train.jsonl      RL prompts                {"prompt", "messages", "answer"}
  coldstart.jsonl  R1-format SFT rows        {"messages": [user, assistant "<think>\\n...\\n</think>\\n\\boxed{N}"]}
  pretrain.jsonl   plain-text LM corpus      {"text"}  (worked steps, no chat / <think> / \\boxed)
  coldstart_large.jsonl, coldstart_mixed.jsonl   the SFT sets of rl_start/ (see data/tiny/README.md)
  general.jsonl    general chat SFT rows     {"messages"}  (no reasoning; data/tiny_chat.py)
  general_prompts.jsonl, general_test.jsonl      general RL prompts {"prompt", "messages"} (no answer: RM-scored)
  prefs.jsonl, prefs_test.jsonl                  preference pairs {"prompt", "chosen", "rejected"} (politeness)
  tokenizer/       tokenizer.json + tokenizer_config.json (ChatML, Qwen-style digit splitting)
Every problem appears in at most one file, so nothing held out was ever seen in training.
"""

import argparse
import itertools
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data import tiny_chat, tiny_task
from data.jsonl import write_jsonl

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special: skipped by decode(skip_special_tokens)
THINK_TOKENS = ["<think>", "</think>"]  # added but not "special" (as in Qwen3), so decoded text keeps them
# ChatML without a default system prompt, with tools the way Qwen renders them (Qwen3's tools system turn, Qwen2.5's
# turns): every conversation without tools renders as plain ChatML
CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] + '\\n\\n' }}\n"
    '    {%- endif %}\n'
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\n'
    'For each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n'
    '<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n'
    '</tool_call><|im_end|>\\n" }}\n'
    "{%- elif messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}'
)
# Qwen2's pre-tokenizer split: every digit is its own token (\p{N}), words keep their leading space.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Prompt text other scripts put around a question (R1-Zero template); in the tokenizer's training
# text so it encodes to a few dozen tokens instead of one per character.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: prompt. Assistant:"
)
EXTRA_TEXT = [R1_ZERO_TEMPLATE, "Please reason step by step, and put your final answer within \\boxed{}.",
              "system user assistant"]


def build_tokenizer(texts, vocab_size):
    """Byte-level BPE (all 256 bytes in the base alphabet, so ANY text round-trips) + 5 added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def tokenizer_config(tok):
    decoder = {}
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": t in SPECIAL_TOKENS}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 2048,
        "split_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }


def prompt_row(expr):
    q = tiny_task.question(expr)
    return {"prompt": q, "messages": [{"role": "user", "content": q}], "answer": str(tiny_task.answer(expr))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny"))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--min_ops", type=int, default=2, help="fewest operators per problem (operands = ops + 1)")
    p.add_argument("--max_ops", type=int, default=4)
    p.add_argument("--max_num", type=int, default=20, help="operands are drawn from 0..max_num")
    p.add_argument("--max_value", type=int, default=100, help="reject problems with an intermediate beyond +-this")
    p.add_argument("--paren_prob", type=float, default=0.3)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--n_train", type=int, default=10000)
    p.add_argument("--n_coldstart", type=int, default=3000)
    p.add_argument("--n_pretrain", type=int, default=40000)
    p.add_argument("--n_coldstart_large", type=int, default=20000)
    p.add_argument("--n_coldstart_mixed", type=int, default=6000)
    p.add_argument("--shortcut_frac", type=float, default=0.6,
                   help="coldstart_mixed: fraction of traces that state the result without working it out")
    p.add_argument("--n_general", type=int, default=6000, help="general chat SFT rows (stage 3's non-reasoning mix)")
    p.add_argument("--polite_frac", type=float, default=0.3, help="general.jsonl: fraction of polite answers")
    p.add_argument("--n_general_prompts", type=int, default=2000)
    p.add_argument("--n_general_test", type=int, default=200)
    p.add_argument("--n_prefs", type=int, default=4000)
    p.add_argument("--n_prefs_test", type=int, default=400)
    p.add_argument("--vocab_size", type=int, default=512)
    args = p.parse_args(argv)
    if not 1 <= args.min_ops <= args.max_ops:
        p.error("need 1 <= --min_ops <= --max_ops")

    rng = random.Random(args.seed)
    sizes = {"test": args.n_test, "train": args.n_train, "coldstart": args.n_coldstart, "pretrain": args.n_pretrain}
    # One pool of distinct problems, dealt out in a fixed order: the splits are disjoint by construction.
    seen, splits = set(), {}
    for name, n in sizes.items():
        splits[name], tries = [], 0
        while len(splits[name]) < n:
            expr = tiny_task.generate(rng, args.min_ops, args.max_ops, args.max_num, args.max_value, args.paren_prob)
            tries += 1
            if tries > 50 * n + 1000:
                sys.exit(f"error: cannot find {n} distinct new problems for {name}; widen --max_ops/--max_num")
            if expr not in seen:
                seen.add(expr)
                splits[name].append(expr)

    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    write_jsonl(out("test.jsonl"), [prompt_row(e) for e in splits["test"]])
    write_jsonl(out("train.jsonl"), [prompt_row(e) for e in splits["train"]])
    coldstart = [{"messages": [{"role": "user", "content": tiny_task.question(e)},
                               {"role": "assistant", "content": tiny_task.r1_completion(e)}]}
                 for e in splits["coldstart"]]
    write_jsonl(out("coldstart.jsonl"), coldstart)
    pretrain = [{"text": tiny_task.pretrain_text(e, rng)} for e in splits["pretrain"]]
    write_jsonl(out("pretrain.jsonl"), pretrain)

    # The RL starting point's SFT sets, drawn after everything above from the same stream (so the files above
    # stay as they were) and disjoint from every other file.
    problems = tiny_task.fresh_problems(rng, seen, min_ops=args.min_ops, max_ops=args.max_ops, max_num=args.max_num,
                                        max_value=args.max_value, paren_prob=args.paren_prob)

    def fresh_problems(n):
        return list(itertools.islice(problems, n))

    def r1_row(expr, shortcut=False):
        return {"messages": [{"role": "user", "content": tiny_task.question(expr)},
                             {"role": "assistant", "content": tiny_task.r1_completion(expr, shortcut)}]}

    write_jsonl(out("coldstart_large.jsonl"), [r1_row(e) for e in fresh_problems(args.n_coldstart_large)])
    write_jsonl(out("coldstart_mixed.jsonl"), [r1_row(e, rng.random() < args.shortcut_frac)
                                               for e in fresh_problems(args.n_coldstart_mixed)])

    # The general (non-reasoning) side: one seeded stream per kind of file, apart from the arithmetic one, so that
    # no file changes when another's size does; the held-out files use names that nothing trained on contains
    # (tiny_chat.TEST_NAMES).
    names, test_names = tiny_chat.NAMES, tiny_chat.TEST_NAMES
    rng_sft, rng_prompts, rng_prefs = (random.Random(f"{args.seed}:{kind}") for kind in ("general", "prompts", "prefs"))
    write_jsonl(out("general.jsonl"), [tiny_chat.sft_row(rng_sft, names, args.polite_frac)
                                       for _ in range(args.n_general)])
    write_jsonl(out("general_prompts.jsonl"), [tiny_chat.prompt_row(rng_prompts, names)
                                               for _ in range(args.n_general_prompts)])
    write_jsonl(out("general_test.jsonl"), [tiny_chat.prompt_row(rng_prompts, test_names)
                                            for _ in range(args.n_general_test)])
    write_jsonl(out("prefs.jsonl"), [tiny_chat.preference_row(rng_prefs, names) for _ in range(args.n_prefs)])
    write_jsonl(out("prefs_test.jsonl"), [tiny_chat.preference_row(rng_prefs, test_names)
                                          for _ in range(args.n_prefs_test)])

    # Tokenizer trained on everything the tiny model will read, chat-rendered cold-start rows included.
    texts = [r["text"] for r in pretrain] + EXTRA_TEXT
    texts += [m["content"] for r in coldstart for m in r["messages"]] + ["user\n", "assistant\n"] * len(coldstart)
    tok = build_tokenizer(texts, args.vocab_size)
    tok_dir = out("tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok.save(os.path.join(tok_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(tokenizer_config(tok), f, indent=2, ensure_ascii=False)
        f.write("\n")

    for name, n in {**sizes, "coldstart_large": args.n_coldstart_large, "coldstart_mixed": args.n_coldstart_mixed,
                    "general": args.n_general, "general_prompts": args.n_general_prompts,
                    "general_test": args.n_general_test, "prefs": args.n_prefs,
                    "prefs_test": args.n_prefs_test}.items():
        print(f"{name:>9}: {n} rows")
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {args.out_dir}")


if __name__ == "__main__":
    main()
