"""train_sft.py: loss masks, packing, data errors, mixing, exact resume, DDP == one process."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import dataloader
import train_sft
from helpers import make_tiny_checkpoint, make_tiny_tokenizer, torchrun, write_jsonl
from model import ModelConfig, Transformer
from tokenizer import Tokenizer
from tools import schemas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizers")


def _chat(a, b, think=True):
    body = f"<think>\n{a}+{b}={a + b}\n</think>\n" if think else ""
    return [{"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "content": body + f"\\boxed{{{a + b}}}"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_tiny_checkpoint(path, std=0.02, vocab_size=320)  # init_weights' default std
    return str(path)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"messages": _chat(a, b)} for a in range(12) for b in range(0, 12, 2)]  # 72 chats of ~30-40 tokens
    rows += [{"prompt": f"What is {a}*2?", "completion": f"\\boxed{{{2 * a}}}"} for a in range(8)]
    return write_jsonl(d / "sft.jsonl", rows)


def _cfg(**kw):
    return train_sft.configure([f"--{k}={v}" for k, v in kw.items()])

def _data(cfg):
    """load_examples' keywords from a train_sft config."""
    return dict(mode=cfg.mode, max_seq_len=cfg.max_seq_len, skip_bad_rows=cfg.skip_bad_rows)



# -----------------------------------------------------------------------------
# configurator


def test_configure_types_and_errors():
    cfg = _cfg(lr=3e-4, batch_size="1e1", pack=0, out_dir="x")
    assert cfg.lr == 3e-4 and cfg.batch_size == 10 and cfg.pack == 0 and cfg.out_dir == "x"
    assert train_sft.configure([]).mode == "sft"
    for bad in (["--nope=1"], ["--batch_size=0.5"], ["lr=1"], ["--mode=rl"]):
        with pytest.raises(SystemExit):
            train_sft.configure(bad)


def test_configure_from_keywords():
    """distill.py calls the SFT loop with keywords: typed and checked like a recipe's values, applied after argv."""
    cfg = train_sft.configure(["--lr=1e-3", "--epochs=2"], {"lr": 5e-4, "max_steps": 7, "epochs": 3})
    assert cfg.lr == 5e-4 and cfg.max_steps == 7 and cfg.epochs == 3.0 and type(cfg.epochs) is float
    assert train_sft.configure([], {"pack": 0}).pack == 0
    for bad in ({"nope": 1}, {"batch_size": 0.5}, {"lr": "fast"}, {"max_steps": "7"}):
        with pytest.raises(SystemExit):
            train_sft.configure([], bad)


def test_parse_data_spec():
    assert dataloader.parse_data_spec("a.jsonl,b.jsonl") == [("a.jsonl", None), ("b.jsonl", None)]
    got = dataloader.parse_data_spec("a.jsonl:3,b.jsonl:1")
    assert got == [("a.jsonl", 0.75), ("b.jsonl", 0.25)]
    with pytest.raises(ValueError, match="weight for every file"):
        dataloader.parse_data_spec("a.jsonl:1,b.jsonl")


# -----------------------------------------------------------------------------
# loss masks: exactly the assistant tokens (+ the turn-closing token), for each template family


def _learned_text(tok, rows):
    """Decode the tokens that get a loss, per example, through the same path training uses."""
    texts = []
    for row in rows:
        ids, mask = dataloader.row_to_example(row, tok, "sft", "x:1")
        batch = dataloader.collate([[(ids, mask)]], tok.pad_id)
        t = batch["targets"][0]
        keep = t != -100
        # a target is always the next input token
        assert torch.equal(t[:-1][keep[:-1]], batch["input_ids"][0, 1:][keep[:-1]])
        texts.append(tok.decode(t[keep].tolist()))
    return texts


@pytest.mark.parametrize("family", ["qwen2.5", "deepseek-r1-distill-qwen", "tiny-chatml"])
def test_loss_mask_is_exactly_the_assistant_tokens(tmp_path, family):
    if family == "tiny-chatml":  # ChatML without a default system prompt
        tok = Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path))
    else:
        tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, family))
    end = "<｜end▁of▁sentence｜>" if "deepseek" in family else "<|im_end|>"
    answer = "<think>\n3+4=7\n</think>\n\\boxed{7}"
    rows = [
        {"messages": [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": answer}]},
        {"prompt": "What is 3+4?", "completion": answer},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "3+4?"},
                      {"role": "assistant", "content": answer}]},
    ]
    got = _learned_text(tok, rows)
    assert got[0] == got[1] == answer + end
    assert got[2] == "Hello." + end + answer + end  # both assistant turns, nothing of system/user


def _tool_chat(a, b):
    """A cold-start conversation that calls the calculator (the tiny world's tool format)."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}}
    return {"tools": schemas(["calculator"]), "messages": [
        {"role": "user", "content": f"What is {a}*{b}?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(a * b)}, {"role": "assistant", "content": f"\\boxed{{{a * b}}}"}]}


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "tiny"])
def test_tool_turns_are_masked_and_calls_learned(family):
    path = os.path.join(ROOT, "data", "tiny", "tokenizer") if family == "tiny" else os.path.join(FIXTURES, family)
    tok = Tokenizer.from_pretrained(path)
    got = _learned_text(tok, [_tool_chat(6, 7)])[0]
    think = "<think>\n\n</think>\n\n" if family == "qwen3" else ""  # Qwen3's last turn always has a think block
    assert got == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call><|im_end|>'
                   f"{think}\\boxed{{42}}<|im_end|>")  # the result "42" and the tool turn are not learned


def test_sft_on_tool_conversations_runs_and_rejects_bad_tools(tmp_path):
    data = write_jsonl(tmp_path / "tools.jsonl", [_tool_chat(a, b) for a in range(2, 9) for b in range(3, 9)])
    res = _run(os.path.join(ROOT, "data", "tiny", "model"), data, str(tmp_path / "out"), max_steps=3, eval_every=0,
               max_seq_len=768)  # the tools' schemas in the system turn are about 500 tiny tokens
    assert res["step"] == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [_tool_chat(2, 3), {**_tool_chat(2, 4), "tools": "calculator"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: .tools. must be a list"):
        _run(os.path.join(ROOT, "data", "tiny", "model"), bad, str(tmp_path / "out2"), max_steps=1)
    plain = write_jsonl(tmp_path / "plain.jsonl", [_tool_chat(2, 3)])
    with pytest.raises(ValueError, match="plain.jsonl:1: .*has no tool calls"):
        _run(make_tiny_checkpoint(tmp_path / "plain_ckpt"), plain, str(tmp_path / "out3"), max_steps=1)


# -----------------------------------------------------------------------------
# packing


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=60), st.integers(32, 64))
def test_best_fit_packs_every_example_once_within_max_len(lengths, max_len):
    rows = dataloader.pack_best_fit(lengths, max_len)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max_len for r in rows)
    # best fit never leaves two rows that could have been merged... at least it beats one-per-row
    assert len(rows) <= len(lengths) and len(rows) >= -(-sum(lengths) // max_len)


def test_packed_loss_and_grads_equal_unpacked():
    """In fp64: summed in another order, an fp32 gradient near 0 moves past any tight absolute bound on some CPU."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, dtype="float32")).init_weights(0.1)
    model.double()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (5, 17, 9, 30, 3, 12, 22, 8):
        ids = torch.randint(0, 96, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # prompt then answer
        examples.append((ids, mask))
    rows = [[examples[i] for i in r] for r in dataloader.pack_best_fit([len(e[0]) for e in examples], 40)]
    assert len(rows) < len(examples) and any(len(r) > 1 for r in rows)

    def grads():
        return [p.grad.clone() for p in model.parameters()]

    # packed: the training path (block-diagonal mask, positions reset per document, fused chunked CE)
    batch = dataloader.collate(rows, pad_id=0)
    n = (batch["targets"] != -100).sum()
    model.zero_grad()
    packed = train_sft.batch_loss_sum(model, model.lm_head.weight, batch, chunk=16) / n
    packed.backward()
    g_packed = grads()
    # unpacked: every example alone, full logits, F.cross_entropy
    model.zero_grad()
    total, count = 0.0, 0
    for ids, mask in examples:
        x = torch.tensor(ids)[None]
        y = torch.where(torch.tensor(mask[1:], dtype=torch.bool), x[0, 1:], -100)
        total = total + F.cross_entropy(model(x)[0, :-1], y, reduction="sum")
        count += int((y != -100).sum())
    assert count == n
    (total / count).backward()
    torch.testing.assert_close(packed, total / count, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_packed, grads()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_collate_targets_positions_and_mask():
    rows = [[([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], [([6, 7, 8, 9], [0, 0, 1, 1])]]
    b = dataloader.collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["targets"].tolist() == [[2, 3, -100, 5, -100], [-100, 8, 9, -100, -100]]  # never across docs
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    m = dataloader.packed_attention_mask(b["doc_ids"])[:, 0]
    assert not m[0, 3, 2] and m[0, 4, 3] and not m[0, 3, 4]  # doc 2 can't see doc 1; causal inside
    assert m.diagonal(dim1=1, dim2=2).all()  # padding sees itself: no NaN rows
    single = dataloader.collate([[([1, 2, 3], [0, 1, 1])]], pad_id=0)
    assert dataloader.packed_attention_mask(single["doc_ids"]) is None  # plain causal fast path


# -----------------------------------------------------------------------------
# data errors: file:line, or a counted skip


def test_bad_rows_name_file_and_line(tmp_path, ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    good = json.dumps({"messages": _chat(1, 2)})
    cases = {
        "malformed": ([good, '{"messages": [', good], ":2: invalid JSON"),
        "no_assistant": ([good, "", json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
                         ":3: no assistant turn"),
        "bad_content": ([json.dumps({"messages": [{"role": "user", "content": 3},
                                                  {"role": "assistant", "content": "x"}]})], ":1: message 0"),
        "no_fields": ([json.dumps({"text": "hello"})], ":1: expected a 'messages'"),
    }
    for name, (lines, msg) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(ValueError, match=f"{name}.jsonl{msg}"):
            dataloader.load_examples([path], tok, **_data(_cfg()))
    # the same files with --skip_bad_rows=1: counted, and the good rows are kept
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, '{"messages": [', good, json.dumps({"messages": []}), good])
    (examples,), stats = dataloader.load_examples([path], tok, **_data(_cfg(skip_bad_rows=1)), log=lambda *a: None)
    assert len(examples) == 3 and stats["skipped"] == 1  # (read_jsonl counts the JSON error itself)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl"):
        dataloader.load_examples([empty], tok, **_data(_cfg()))


def _sharded_load(rank, world, init_file, tok_dir, paths, counts, results):
    """One DDP rank of test_each_rank_tokenizes_only_its_shard."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tok = Tokenizer.from_pretrained(tok_dir)
    calls = []
    original = dataloader.row_to_example
    dataloader.row_to_example = lambda row, *a: calls.append(row) or original(row, *a)
    try:
        (examples,), _ = dataloader.load_examples(paths[:1], tok, **_data(_cfg()), log=lambda *a: None, rank=rank,
                                                  world=world)
        results[rank] = [(ids.tolist(), mask.tolist()) for ids, mask in examples]
        counts[rank] = len(calls)
        try:
            dataloader.load_examples(paths[1:], tok, **_data(_cfg()), log=lambda *a: None, rank=rank, world=world)
        except ValueError as e:  # the bad row is on rank 1's shard; rank 0 must raise it too, not hang
            results[f"error{rank}"] = str(e)
    finally:
        dist.destroy_process_group()


def test_each_rank_tokenizes_only_its_shard(tmp_path, ckpt):
    """Under DDP each rank tokenises every world-th row, yet all ranks end with the one-process examples."""
    import torch.multiprocessing as mp

    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": _chat(a, a + 1)} for a in range(9)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": _chat(1, 2)}, {"text": "x"}, {"messages": _chat(3, 4)}])
    (single,), _ = dataloader.load_examples([good], Tokenizer.from_pretrained(ckpt), **_data(_cfg()),
                                            log=lambda *a: None)
    with mp.Manager() as manager:
        counts, results = manager.dict(), manager.dict()
        mp.spawn(_sharded_load, args=(2, str(tmp_path / "store"), str(ckpt), [good, bad], counts, results), nprocs=2)
        counts, results = dict(counts), dict(results)
    assert counts == {0: 5, 1: 4}  # rows 0,2,4,6,8 and 1,3,5,7
    expected = [(ids.tolist(), mask.tolist()) for ids, mask in single]
    assert results[0] == results[1] == expected
    assert results["error0"] == results["error1"] and "bad.jsonl:2: expected a 'messages'" in results["error0"]


def test_truncation_is_counted_never_silent(tmp_path, ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "7 " * 60}]}
    long_prompt = {"messages": [{"role": "user", "content": "1 " * 80}, {"role": "assistant", "content": "7"}]}
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": _chat(1, 2)}, long_answer, long_prompt])
    logs = []
    (examples,), stats = dataloader.load_examples([path], tok, **_data(_cfg(max_seq_len=48)), log=logs.append)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and len(examples) == 2
    assert all(len(ids) <= 48 for ids, _ in examples)
    assert any("long.jsonl:2" in line for line in logs) and any("dropped" in line for line in logs)
    # pretrain: long documents are split, every token still predicted exactly once
    pieces, truncated = dataloader.fit_length(list(range(100)), [1] * 100, 32, "pretrain")
    assert not truncated and all(len(p[0]) <= 32 for p in pieces)
    assert sum(len(p[0]) - 1 for p in pieces) == 99


# -----------------------------------------------------------------------------
# mixing and the data stream


def test_mixing_weights_and_determinism():
    a = [([i, 0], [0, 1]) for i in range(10)]
    b = [([i, 1], [0, 1]) for i in range(100, 200)]
    rows = dataloader.epoch_packs([a, b], [0.5, 0.5], 8, seed=3, epoch=0, do_pack=False)
    src = [r[0][0][1] for r in rows]
    assert len(rows) == 110 and src.count(0) == 55 and src.count(1) == 55  # small file repeated
    counts = [sum(r[0][0][0] == i for r in rows) for i in range(10)]
    assert set(counts) <= {5, 6}  # repeats spread evenly: whole passes, then part of one
    assert rows == dataloader.epoch_packs([a, b], [0.5, 0.5], 8, seed=3, epoch=0, do_pack=False)
    assert rows != dataloader.epoch_packs([a, b], [0.5, 0.5], 8, seed=3, epoch=1, do_pack=False)
    once = dataloader.epoch_packs([a, b], None, 8, seed=3, epoch=0, do_pack=True)
    assert sorted(ex[0][0] for r in once for ex in r) == list(range(10)) + list(range(100, 200))


def test_row_stream_position_resumes_exactly():
    src = [[([i, i + 1, i + 2], [0, 1, 1]) for i in range(13)]]
    s = dataloader.PackStream(src, None, 8, 0, True)
    s.take(3)
    s.take(4)  # straddles the epoch boundary (5 packed rows per epoch)
    t = dataloader.PackStream(src, None, 8, 0, True, **s.state())
    assert s.take(7) == t.take(7) and s.state() == t.state()


# -----------------------------------------------------------------------------
# end to end: exact resume, grad accumulation, pretrain mode, DDP


def _run(ckpt, data, out, **kw):
    args = dict(init_from=ckpt, data=data, out_dir=out, max_seq_len=96, batch_size=2, max_steps=6,
                lr=3e-3, warmup_steps=2, eval_frac=0.1, eval_every=2, progress=0, log_every=1)
    args.update(kw)
    return train_sft.main([f"--{k}={v}" for k, v in args.items()])


def _params(out):
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def test_kill_and_resume_reaches_the_same_parameters(tmp_path, ckpt, sft_data, capsys):
    full = _run(ckpt, sft_data, str(tmp_path / "full"), save_every=3)
    crashed = _run(ckpt, sft_data, str(tmp_path / "resumed"), save_every=3, stop_after=4)
    assert crashed["step"] == 4  # ran past its checkpoint at 3, then died without saving step 4
    resumed = _run(ckpt, sft_data, str(tmp_path / "resumed"), save_every=3, resume=1)
    assert resumed["step"] == 6 and "resumed from" in capsys.readouterr().out
    a, b = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["eval_loss"] == resumed["eval_loss"]
    sa = torch.load(tmp_path / "full" / "ckpt" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "resumed" / "ckpt" / "trainer_state.pt", weights_only=False)
    assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == 6
    # metrics: one line per step, the crashed run's step 4 replaced by the resumed one's
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the checkpoint is self-contained: model + tokenizer load from it
    ck = tmp_path / "full" / "ckpt"
    Transformer.from_pretrained(ck)
    assert Tokenizer.from_pretrained(ck).vocab_size == Tokenizer.from_pretrained(ckpt).vocab_size


def test_grad_accum_equals_bigger_batch(tmp_path, ckpt, sft_data):
    """In fp64: AdamW turns the rounding of another summation order into steps of up to lr."""
    kw = dict(max_steps=3, eval_frac=0, dtype="float64")
    _run(ckpt, sft_data, str(tmp_path / "a"), batch_size=4, grad_accum=1, **kw)
    _run(ckpt, sft_data, str(tmp_path / "b"), batch_size=1, grad_accum=4, **kw)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10)


def test_pretrain_mode_from_scratch(tmp_path, ckpt):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{a}+{b}={a + b}. " * 3} for a in range(9) for b in range(9)])
    out = str(tmp_path / "pt")
    conf = json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1))
    res = train_sft.main(["--mode=pretrain", "--init_from=scratch", f"--tokenizer={ckpt}", f"--model_config={conf}",
                          f"--data={data}", f"--out_dir={out}", "--max_seq_len=64", "--batch_size=4",
                          "--max_steps=8", "--lr=1e-2", "--warmup_steps=1", "--progress=0", "--eval_every=4",
                          "--log_every=1"])
    assert res["step"] == 8
    m = Transformer.from_pretrained(os.path.join(out, "ckpt"))
    assert m.config.vocab_size == 320 and m.config.hidden_size == 32  # tokenizer's 300 rounded up to 64
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert recs[-1]["loss"] < recs[0]["loss"] and "eval_loss" in recs[-1]


def test_ddp_two_ranks_equal_one_process(tmp_path, ckpt, sft_data):
    """torchrun --nproc_per_node=2 (gloo) == one process with the same global batch (in fp64, as above)."""
    common = dict(init_from=ckpt, data=sft_data, max_seq_len=96, max_steps=3, lr=3e-3, warmup_steps=1,
                  eval_frac=0.1, eval_every=2, progress=0, grad_accum=2, dtype="float64")
    ddp_out = str(tmp_path / "ddp")
    args = [f"--{k}={v}" for k, v in {**common, "out_dir": ddp_out, "batch_size": 2}.items()]
    assert "world 2" in torchrun("train_sft.py", args)
    single = train_sft.main([f"--{k}={v}" for k, v in {**common, "out_dir": str(tmp_path / "one"),
                                                        "batch_size": 4}.items()])
    a, b = _params(ddp_out), _params(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10)
    last = [json.loads(line) for line in open(os.path.join(ddp_out, "metrics.jsonl"))][-1]
    assert last["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
