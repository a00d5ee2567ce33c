"""Shared test helpers: small random Qwen2/Qwen3 checkpoints written in HF layout by the tests themselves."""
import os

import torch


def hf_config(model_type="qwen2", **overrides):
    """A tiny transformers config (Qwen2Config / Qwen3Config) with random-checkpoint-friendly defaults."""
    from transformers import Qwen2Config, Qwen3Config

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    kw.update(overrides)
    if model_type == "qwen3":
        kw.setdefault("head_dim", 32)
        return Qwen3Config(**kw)
    return Qwen2Config(**kw)


def tiny_hf_checkpoint(path, model_type="qwen2", seed=0, dtype=torch.float32, max_shard_size=None, head="causal_lm",
                       **overrides):
    """Write a random transformers Qwen2/Qwen3 model to `path` (HF layout); returns the HF model (eval mode).
    head: "causal_lm" (Qwen2ForCausalLM) or "seq_cls" (Qwen2ForSequenceClassification, a reward model).
    Weights are drawn with a larger std than HF's default so logits are not all ~0 (a weak parity check)."""
    import transformers

    torch.manual_seed(seed)
    suffix = {"causal_lm": "ForCausalLM", "seq_cls": "ForSequenceClassification"}[head]
    cls = getattr(transformers, ("Qwen3" if model_type == "qwen3" else "Qwen2") + suffix)
    model = cls(hf_config(model_type, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return model


# ---- train_sft helpers: a tiny BPE tokenizer + random checkpoint, built without transformers (fast)

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def make_tiny_tokenizer(path, vocab_size=300):
    """A byte-level BPE (~300 tokens) with ChatML special tokens and a plain ChatML chat template
    (no default system prompt), written as tokenizer.json + tokenizer_config.json into `path`."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"What is {a} + {b}? <think>{a} plus {b} is {a + b}.</think> The answer is \\boxed{{{a + b}}}."
              for a in range(20) for b in range(0, 20, 3)] + ["user assistant system"] * 5
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                   "chat_template": CHATML_TEMPLATE}, f)
    return path


def make_tiny_checkpoint(path, seed=0, std=0.1, vocab_size=None, **overrides):
    """A random tiny nanoR1 Transformer + the tiny byte-level ChatML tokenizer in one HF-layout dir; returns path.
    vocab_size None: exactly the tokenizer's (every id decodes). std > the usual 0.02 makes next-token
    distributions peaked enough that greedy parity checks are not decided by float noise."""
    import os
    import shutil
    import tempfile

    from model import ModelConfig, Transformer
    from tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        make_tiny_tokenizer(tok_dir)
        kw = dict(vocab_size=vocab_size or Tokenizer.from_pretrained(tok_dir).vocab_size, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, dtype="float32")
        kw.update(overrides)
        torch.manual_seed(seed)
        # save_pretrained swaps the whole directory in, so the tokenizer files are copied in afterwards
        Transformer(ModelConfig(**kw)).init_weights(std=std).save_pretrained(path)
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), path)
    return path


def write_jsonl(path, rows):
    """Rows (dicts, or raw strings for malformed-line tests) to a JSONL file; returns its path as a str."""
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args, nproc=2, timeout=300, env=None):
    """Run one of the repo's scripts under `torchrun --nproc_per_node=nproc` (gloo on the CPU, one thread per rank,
    a free port, env added to this process's environment); asserts it succeeded and returns its stdout."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={port}", os.path.join(REPO, script), *args],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def corrupt_safetensors(path, fn):
    """Apply fn to the tensors of path (a model.safetensors, as a dict) and write them back; returns path."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    fn(state)
    save_file(state, path)
    return path


def sandbox_processes():
    """Live processes started by sandbox.run_python (the marker is in their argv), but the fork server that waits in
    sandbox.SERVER for the next call."""
    from sandbox import SANDBOX_MARKER, SERVER

    found, waiting = [], {SERVER.proc.pid} if SERVER.proc is not None else set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if SANDBOX_MARKER.encode() in f.read() and int(pid) not in waiting:
                    found.append(int(pid))
        except (OSError, ValueError):
            pass
    return found


class ScriptedLM(torch.nn.Module):
    """A stand-in for a Transformer in Engine tests: its next-token logits are `next_logits(history)` of each row's
    whole token history (prompt and completion so far), which it reads back from the KV cache the Engine hands it
    (it stores the token ids there as keys), so it follows every row through padding, fan-out and compaction."""

    def __init__(self, vocab_size, next_logits):
        from types import SimpleNamespace

        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the Engine reads device and dtype off a parameter
        self.next_logits = next_logits

    def forward(self, input_ids, attention_mask=None, kv_cache=None, logits_to_keep=0, return_hidden=False, **_):
        B, T = input_ids.shape
        kv_cache.prepare(torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        keys, _ = kv_cache.update(0, *[input_ids.to(kv_cache.dtype)[:, None, :, None]] * 2)
        valid = (kv_cache.valid if kv_cache.rows is None else kv_cache.valid[kv_cache.rows])[:, :keys.shape[2]]
        rows = [keys[b, 0, :, 0][valid[b]].long().tolist() for b in range(B)]
        logits = torch.stack([self.next_logits(h) for h in rows])[:, None, :]
        return logits.expand(B, T, -1) if return_hidden else logits  # "hidden": every position sees the whole row

    def lm_head(self, hidden):
        return hidden
