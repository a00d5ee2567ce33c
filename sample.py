"""
Sample from a checkpoint: continue one prompt (streamed), evaluate on a problem set, or rejection-sample SFT data
(R1 stage 3). The sampling itself is engine.Engine; evaluation and the stage-3 filters are tasks.py and rejection.py.

    python sample.py                                                  # the embedded tiny model, one test problem
    python sample.py --init_from=DIR --prompt="What is 2+3?" --temperature=0
    python sample.py --init_from=DIR --eval --data=data/tiny/test.jsonl --num_samples=8 --temperature=0.6
    torchrun --nproc_per_node=8 sample.py --init_from=DIR --eval --data=FILE.jsonl --num_samples=16
    python sample.py --reject=1 --init_from=DIR --data=PROBLEMS.jsonl --num_samples=4 --out=SFT.jsonl  # R1 stage 3
    python sample.py --init_from=DIR --eval --prompt_template=chat --tools=python --tool_format=code --out=FILE

--prompt_template (chat | raw | r1zero | tir) says how a bare prompt becomes tokens, for --prompt, --eval and --reject
alike: the tokenizer's chat template, the text as it is, R1-Zero's template, or tasks.TIR_TEMPLATE (it offers
```python blocks, for --tools=python on a base model); rows with `messages` are always
chat-templated. Under torchrun, --eval and --reject split the problems over the ranks and rank 0 writes the result.
--tools=python (or calculator, comma-separated) lets the model call tools while it writes, in --tool_format chat
(<tool_call> turns, the schemas listed in the chat template's system turn) or code (```python fences answered by
```output blocks). Every --eval line is a sample's tasks.Rollout.record(): its text (what the model wrote, what it is
scored on), transcript (every token decoded, a tool's output too), tokens, loss_mask (0 on a tool's tokens) and
tool_calls, with its scores.
"""
import os
import sys
import time

import torch

from configurator import parse_overrides
from data.jsonl import write_jsonl
from engine import Engine
from lora import tokenizer_dir
from model import Transformer, is_checkpoint_dir
from rejection import rejection_sample, save_samples
from reward import is_equiv
from tasks import PROMPT_TEMPLATES, encode_problem, load_problems, maj_at_k, pass_at_1, pass_at_k, score_problems
from tokenizer import Tokenizer
from tools import TOOL_FORMATS, tool_use
from train_common import exit_if_torchrun, setup_runtime, teardown

REPO = os.path.dirname(os.path.abspath(__file__))
TINY_BASE = os.path.join(REPO, "data/tiny/model")  # shipped: pretrained on plain-text worked solutions only
TINY_SFT = os.path.join(REPO, "out/sft/ckpt")  # what `python train_sft.py` writes (chat + <think>)
TINY_GRPO = os.path.join(REPO, "out/grpo/ckpt")  # what the quickstart's `python train_grpo.py` writes
DEFAULT_DATA = os.path.join(REPO, "data/tiny/test.jsonl")

CONFIG = dict(
    init_from="",  # HF-layout checkpoint dir with tokenizer files; "": TINY_GRPO, else TINY_SFT, else TINY_BASE
    prompt="",  # text to continue; empty: the first problem of --data
    prompt_template="chat",  # chat | raw | r1zero | tir: how a bare prompt is encoded (`messages` rows: always chat)
    num_samples=1,
    max_new_tokens=256,
    temperature=0.8,  # 0 = greedy
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    stop="",  # extra stop string
    seed=1337,
    eval=False,  # score --data with reward.py: pass@1, maj@K, pass@K
    reject=0,  # 1: rejection sampling (R1 stage 3): --num_samples per problem of --data, kept ones -> --out (SFT rows)
    data=DEFAULT_DATA,  # problems JSONL; --reject takes several, comma-separated (the report gives each file's rate)
    out="",  # output JSONL (default out/eval/<data name>.jsonl, --reject: out/reject/<data name>.jsonl + .report.json)
    max_per_prompt=1,  # --reject: keep at most this many samples per problem (0: every one that passes)
    prefer="shortest",  # --reject: which good samples to keep past max_per_prompt: shortest | random (seeded)
    max_completion_tokens=0,  # --reject: length budget in generated tokens (0: none beyond finishing in max_new_tokens)
    ngram_size=20,  # --reject: a sample is degenerate when one ngram_size-gram (words, numbers, symbol runs)...
    max_ngram_repeats=4,  # ...occurs more than this many times in it (a repeated loop)
    lang="en",  # --reject: language the chain of thought must be written in (reward.language_consistency_reward)
    min_language=1.0,  # --reject: least fraction of CoT words in --lang (R1 drops mixed-language CoTs)
    batch_size=32,  # problems per generate call in --eval / --reject (x num_samples rows)
    tools="",  # tools the model may call while it writes, comma-separated (tools.py: calculator, python); "": none
    tool_format="auto",  # chat | code | auto: chat under a chat template that has tool calls, else code
    max_tool_calls=4,  # calls per completion; one past this gets an error result
    max_tool_output_tokens=256,  # a longer result is cut, with a marker that says so
    tool_timeout=5.0,  # seconds per call
    tools_in_prompt=1,  # chat format: the prompts list the tools' JSON schemas (0: a model that learned them in SFT)
    lora_base="",  # an adapter dir as init_from: its base, where its adapter_config.json names none that exists here
    device="auto",
    dtype="auto",  # float32 | bfloat16 | auto (bf16 on CUDA)
    cuda_graphs=1,
    compile=0,  # 1: torch.compile the CUDA-graph decode step (experimental)
)
USAGE = __doc__.split("\n\n--prompt_template")[0]


def main(argv):
    cfg = parse_overrides(argv, CONFIG)
    if cfg["prompt_template"] not in PROMPT_TEMPLATES:
        raise SystemExit(f"--prompt_template={cfg['prompt_template']}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    if cfg["tool_format"] not in ("auto",) + TOOL_FORMATS:
        raise SystemExit(f"--tool_format={cfg['tool_format']}: expected one of auto, {', '.join(TOOL_FORMATS)}")
    if not cfg["init_from"]:
        cfg["init_from"] = next((d for d in (TINY_GRPO, TINY_SFT) if is_checkpoint_dir(d)), TINY_BASE)
    if not is_checkpoint_dir(cfg["init_from"]):
        if not argv:  # bare `python sample.py` before the tiny model exists
            print(f"no checkpoint at {cfg['init_from']}/ yet (train one with train_sft.py).\nusage:{USAGE}")
            return 0
        raise SystemExit(f"{cfg['init_from']}: no config.json (expected a checkpoint directory or a LoRA adapter's)")
    rt = setup_runtime(cfg["device"], "auto", cfg["seed"])  # torchrun: one process per device
    dtype = {"auto": torch.bfloat16 if rt.dev_type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    model = Transformer.from_pretrained(cfg["init_from"], dtype=dtype, device=rt.device,
                                        lora_base=cfg["lora_base"] or None).eval()
    tok = Tokenizer.from_pretrained(tokenizer_dir(cfg["init_from"], cfg["lora_base"]))
    engine = Engine(model, tok, cuda_graphs=bool(cfg["cuda_graphs"]) and rt.dev_type == "cuda",
                    compile=bool(cfg["compile"]))
    try:
        tools = tool_use(tok, cfg["tools"], cfg["tool_format"], cfg["prompt_template"], cfg["max_tool_calls"],
                         cfg["max_tool_output_tokens"], cfg["tool_timeout"], bool(cfg["tools_in_prompt"]))
    except ValueError as e:
        raise SystemExit(f"--tools={cfg['tools']}: {e}") from None
    sampling = dict(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                    top_p=cfg["top_p"], min_p=cfg["min_p"], stop=[cfg["stop"]] if cfg["stop"] else None, tools=tools)
    if tools is not None and rt.master:
        print(f"tools: {tools.describe()}", file=sys.stderr)
    if cfg["reject"]:
        if tools is not None:  # a kept sample would need its tool turns as messages, not one assistant text
            raise SystemExit("--reject=1 does not take --tools yet")
        run_reject(engine, tok, cfg, sampling, rt)
    elif cfg["eval"]:
        run_eval(engine, tok, cfg, sampling, rt)
    else:
        run_prompt(engine, tok, cfg, sampling)
    teardown(rt)
    return 0


def prompt_tools(sampling):
    """The tool schemas a prompt lists in its system turn (the chat tool format), else None."""
    return sampling["tools"].schemas if sampling["tools"] is not None else None


def run_prompt(engine, tok, cfg, sampling):
    """Continue --prompt (or the first problem of --data); one sample is streamed as it is generated."""
    template = cfg["prompt_template"]
    if cfg["prompt"]:
        row = {"prompt": cfg["prompt"]}
    elif os.path.isfile(cfg["data"]):
        row = load_problems(cfg["data"])[0]
        if os.path.isdir(TINY_BASE) and os.path.samefile(cfg["init_from"], TINY_BASE):  # a base model continues its
            row, template = {"prompt": f"Q: {row['prompt']}\nA:"}, "raw"  # pretraining format
    else:
        raise SystemExit("give --prompt=... (or --data with problems)")
    ids = encode_problem(tok, row, template, prompt_tools(sampling))
    print(tok.decode(ids), end="", flush=True)
    if cfg["num_samples"] > 1:
        for j, c in enumerate(engine.generate([ids], num_samples=cfg["num_samples"], seed=cfg["seed"], **sampling)[0]):
            print(f"\n--- sample {j} (finish_reason={c.finish_reason} tokens={len(c.tokens)})\n{c.transcript}")
        return
    got, shown = [], [0]

    def on_tokens(_, new):  # print the new suffix whenever it is whole characters
        got.extend(new)  # a stop token shows once more follow it (in a tool turn); the one that ends it never does
        text = tok.decode(got[:-1] if got[-1] in tok.stop_ids else got)
        if not text.endswith("\ufffd"):  # a partial UTF-8 sequence: wait for the rest of it
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    c = engine.generate([ids], seed=cfg["seed"], on_tokens=on_tokens, **sampling)[0][0]
    print(c.transcript[shown[0]:] if len(c.transcript) > shown[0] else "")
    print(f"\n--- finish_reason={c.finish_reason} tokens={len(c.tokens)}")


def run_eval(engine, tok, cfg, sampling, rt):
    problems = load_problems(cfg["data"])
    K = cfg["num_samples"]
    t0 = time.time()
    prompts = [encode_problem(tok, row, cfg["prompt_template"], prompt_tools(sampling)) for row in problems]
    results, n_tokens = score_problems(engine, problems, prompts, K, sampling, cfg["seed"], cfg["batch_size"],
                                       rt.rank, rt.world)
    if not rt.master:
        return
    correct = [[r.correct for r in rollouts] for rollouts in results]
    answers = [[r.pred for r in rollouts] for rollouts in results]
    dt = time.time() - t0
    out = cfg["out"] or os.path.join("out", "eval", os.path.splitext(os.path.basename(cfg["data"]))[0] + ".jsonl")
    write_jsonl(out, [r.record() for rollouts in results for r in rollouts])
    print(f"{cfg['data']}: {len(problems)} problems x {K} samples  "
          f"pass@1 {pass_at_1(correct):.4f}  maj@{K} {maj_at_k(correct, answers, is_equiv):.4f}  "
          f"pass@{K} {pass_at_k(correct):.4f}  ({n_tokens} tokens in {dt:.1f}s, {n_tokens / dt:.0f} tok/s)")
    print(f"wrote {out}")


def run_reject(engine, tok, cfg, sampling, rt):
    paths = [p for p in cfg["data"].split(",") if p]
    rows, files = [], []
    for path in paths:
        part = load_problems(path, targets=("answer", "tests"))
        rows += part
        files += [path] * len(part)
    t0 = time.time()
    limits = {k: cfg[k] for k in ("max_per_prompt", "prefer", "ngram_size", "max_ngram_repeats", "lang",
                                  "min_language")}
    kept, report = rejection_sample(engine, tok, rows, cfg["num_samples"], sampling, cfg["seed"],
                                    cfg["prompt_template"], max_completion_tokens=cfg["max_completion_tokens"] or None,
                                    rank=rt.rank, world=rt.world, source=cfg["init_from"], row_files=files,
                                    batch_size=cfg["batch_size"], progress=True, **limits)
    if not rt.master:
        return
    name = "+".join(os.path.splitext(os.path.basename(p))[0] for p in paths)
    out = cfg["out"] or os.path.join("out", "reject", name + ".jsonl")
    save_samples(out, kept, report)
    rejected = ", ".join(f"{r} {n}" for r, n in report["rejected"].items())
    print(f"kept {report['kept']} of {report['samples']} samples ({report['acceptance_rate']:.1%}) from "
          f"{report['problems']} problems x {cfg['num_samples']} ({report['problems_with_kept']} problems with one), "
          f"mean {report['mean_kept_tokens']:.1f} tokens; rejected: {rejected}  ({time.time() - t0:.1f}s)")
    if len(paths) > 1:
        for path, s in report["per_source"].items():
            print(f"  {path}: kept {s['kept']} of {s['samples']} ({s['rate']:.1%})")
    print(f"wrote {out} and {out}.report.json")


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    exit_if_torchrun(rc)
    sys.exit(rc)
