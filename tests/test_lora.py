"""LoRA (lora.py) against PEFT, the reference: the same forward, adapters that load in either direction, the base
with the adapters off; and LoRA through the trainers: only the adapters train, the KL reference is the base, the
sampler is the policy, checkpoints in PEFT's format, resume, torchrun x2, SFT -> GRPO through an adapter dir."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import distill
import train_grpo
import train_sft
from helpers import make_tiny_checkpoint, tiny_hf_checkpoint, torchrun
from lora import LORA_TARGETS, adapters_off, add_lora, lora_model, save_adapter
from model import Transformer
from test_grpo import _run as run_grpo
from test_grpo import data as grpo_data  # noqa: F401 (fixtures)
from test_sft import _run as run_sft
from test_sft import ckpt, sft_data  # noqa: F401

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random transformers Qwen2 on disk: -> (its dir, the HF model)."""
    path = str(tmp_path_factory.mktemp("base"))
    return path, tiny_hf_checkpoint(path)


def _peft_model(hf, rank, alpha, targets=LORA_TARGETS):
    """PEFT's LoRA on hf with random A and B (init_lora_weights=False)."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, config).eval()


def _fresh_hf(path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path).float().eval()


def test_forward_equals_peft_and_adapters_off_is_the_base(base):
    path, _ = base
    pm = _peft_model(_fresh_hf(path), rank=4, alpha=16)
    ours = add_lora(Transformer.from_pretrained(path, dtype=torch.float32), 4, 16).eval()
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v
              for k, v in pm.state_dict().items() if "lora_" in k}
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert theirs.keys() == mine.keys() and len(mine) == 2 * 7 * ours.config.num_hidden_layers
    ours.load_state_dict(theirs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm(IDS).logits, rtol=1e-5, atol=1e-5)
        plain = Transformer.from_pretrained(path, dtype=torch.float32).eval()(IDS)
        assert not torch.allclose(ours(IDS), plain, atol=1e-3)  # the adapters do something...
        with adapters_off(ours):
            assert torch.equal(ours(IDS), plain)  # ...and off, the base bit for bit


def test_a_new_adapter_starts_as_the_base_with_peft_s_init(base):
    path, _ = base
    torch.manual_seed(0)
    ours = add_lora(Transformer.from_pretrained(path, dtype=torch.float32), 8, 32).eval()
    plain = Transformer.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS), plain(IDS))  # B = 0
    a = ours.model.layers[0].self_attn.q_proj.lora_A.weight
    bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / 3 ** 0.5


def _random_adapter(base_dir, out, targets="all-linear"):
    """Our rank-4 adapter with random A and B on the checkpoint base_dir, saved to out; -> the model."""
    ours = add_lora(Transformer.from_pretrained(base_dir, dtype=torch.float32), 4, 16, targets)
    ours.lora["base"] = base_dir
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_adapter(str(out), ours.state_dict(), ours.lora)
    return ours


def test_our_adapter_loads_in_peft_and_peft_s_in_ours(base, tmp_path):
    path, _ = base
    ours = _random_adapter(path, tmp_path / "ours", "q_proj,v_proj,down_proj")
    loaded = peft.PeftModel.from_pretrained(_fresh_hf(path), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = ours.eval()(IDS)
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-5, atol=1e-5)
        # and back: the adapter as our trainers load it, and merged by from_pretrained
        again = lora_model(str(tmp_path / "ours"), 0, 32, "all-linear", "", torch.float32, torch.float32, "cpu")
        assert again.lora["r"] == 4 and again.lora["lora_alpha"] == 16
        torch.testing.assert_close(again.eval()(IDS), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(Transformer.from_pretrained(str(tmp_path / "ours"))(IDS), want, rtol=1e-5,
                                   atol=1e-5)
    pm = _peft_model(_fresh_hf(path), rank=2, alpha=8, targets=("k_proj", "gate_proj", "up_proj"))
    pm.save_pretrained(str(tmp_path / "peft"))
    conf_path = tmp_path / "peft" / "adapter_config.json"
    conf = json.load(open(conf_path))
    assert conf["base_model_name_or_path"] == path
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(str(tmp_path / "peft"))(IDS), pm(IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    json.dump({**conf, "base_model_name_or_path": "/models/moved"}, open(conf_path, "w"))  # a base not here
    with pytest.raises(FileNotFoundError, match=r"its base model '/models/moved' .* --lora_base=DIR"):
        Transformer.from_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(IDS).logits
        torch.testing.assert_close(Transformer.from_pretrained(str(tmp_path / "peft"), lora_base=path)(IDS), want,
                                   rtol=1e-5, atol=1e-5)
        theirs = lora_model(str(tmp_path / "peft"), 0, 32, "all-linear", path, torch.float32, torch.float32, "cpu")
        torch.testing.assert_close(theirs.eval()(IDS), want, rtol=1e-5, atol=1e-5)


def test_bad_targets_and_shapes_are_named(base, tmp_path):
    path, _ = base
    with pytest.raises(ValueError, match="lm_head.*matches no layer.*q_proj, k_proj, v_proj, o_proj, gate_proj"):
        add_lora(Transformer.from_pretrained(path), 4, 16, "q_proj,lm_head")
    ours = add_lora(Transformer.from_pretrained(path), 4, 16, "q_proj")
    ours.lora["base"] = path
    state = ours.state_dict()
    state["model.layers.1.self_attn.q_proj.lora_B.weight"] = torch.zeros(7, 4)
    save_adapter(str(tmp_path / "bad"), state, ours.lora)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.lora_B.weight has shape \[7, 4\], "
                                         r"the base's layer needs \[64, 4\]"):
        Transformer.from_pretrained(str(tmp_path / "bad"))
    conf_path = tmp_path / "bad" / "adapter_config.json"  # per-layer ranks: another scale per layer, not read
    json.dump({**json.load(open(conf_path)), "rank_pattern": {"q_proj": 8}}, open(conf_path, "w"))
    with pytest.raises(ValueError, match="rank_pattern is {'q_proj': 8}; nanoR1 reads plain LoRA"):
        Transformer.from_pretrained(str(tmp_path / "bad"))


def _grpo_lora(ckpt_dir, grpo_data, out, **kw):  # noqa: F811
    return run_grpo(ckpt_dir, grpo_data, out, **{"lora_rank": 4, "beta": 0.04, "lr": 1e-2, **kw})


@pytest.fixture(scope="module")
def grpo_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("grpo_lora") / "ckpt"), std=0.1)


def test_grpo_trains_the_adapters_only_against_the_base(grpo_ckpt, grpo_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    result, stdout, metrics = _grpo_lora(grpo_ckpt, grpo_data, out, max_steps=3, rewards="accuracy:1,language:1")
    assert "reference model: the base (LoRA r=4 adapters switched off)" in stdout
    assert metrics[0]["kl"] == 0 and metrics[-1]["kl"] > 0  # step 1: B = 0, the policy is its base
    assert all(m["logp_mismatch"] < 1e-4 for m in metrics)  # the sampler runs the adapters the trainer trains
    ck = os.path.join(out, "ckpt")
    assert sorted(os.listdir(ck)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                      "tokenizer_config.json", "trainer_state.pt"]
    conf = json.load(open(os.path.join(ck, "adapter_config.json")))
    assert conf["base_model_name_or_path"] == grpo_ckpt and conf["r"] == 4 and conf["lora_alpha"] == 32
    assert conf["target_modules"] == list(LORA_TARGETS) and conf["peft_type"] == "LORA"
    adapters = load_file(os.path.join(ck, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in adapters)
    assert adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B moved off zero
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
    moments = [s["exp_avg"].shape for s in state["optimizer"]["state"].values()]
    assert len(moments) == len(adapters) and all(len(m) == 2 and 4 in m for m in moments)  # AdamW: adapters only


def test_grpo_kill_and_resume_with_lora_is_exact(grpo_ckpt, grpo_data, tmp_path):  # noqa: F811
    kw = dict(max_steps=3, save_every=1)
    _grpo_lora(grpo_ckpt, grpo_data, str(tmp_path / "full"), **kw)
    _grpo_lora(grpo_ckpt, grpo_data, str(tmp_path / "cut"), stop_after=2, **kw)
    _, out, _ = _grpo_lora(grpo_ckpt, grpo_data, str(tmp_path / "cut"), resume=1, **kw)
    assert "at step 2" in out
    a, b = (load_file(str(tmp_path / d / "ckpt" / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_with_lora_on_two_ranks_equals_one_process(grpo_ckpt, grpo_data, tmp_path):  # noqa: F811
    common = dict(init_from=grpo_ckpt, data=grpo_data[0], eval_every=0, max_steps=2, group_size=4,
                  prompts_per_step=4, max_completion_len=16, progress=0, sample_every=0, warmup_steps=1, lr=1e-2,
                  rewards="language:1", lora_rank=4, beta=0.04, dtype="float64")
    torchrun("train_grpo.py", [f"--{k}={v}" for k, v in {**common, "out_dir": tmp_path / "two"}.items()])
    run_grpo(grpo_ckpt, grpo_data, str(tmp_path / "one"), **{k: v for k, v in common.items()
                                                             if k not in ("init_from", "data")})
    a, b = (load_file(str(tmp_path / d / "ckpt" / "adapter_model.safetensors")) for d in ("two", "one"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-10
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


def test_sft_then_grpo_through_an_adapter(ckpt, sft_data, grpo_data, tmp_path):  # noqa: F811
    """SFT with LoRA writes an adapter; GRPO --init_from=that adapter trains the same adapter further on the same base;
    every script that reads a model takes the adapter dir (merged)."""
    run_sft(ckpt, sft_data, str(tmp_path / "sft"), max_steps=3, lora_rank=4, lr=1e-2)
    sft_ck = str(tmp_path / "sft" / "ckpt")
    assert json.load(open(os.path.join(sft_ck, "adapter_config.json")))["base_model_name_or_path"] == ckpt
    before = load_file(os.path.join(sft_ck, "adapter_model.safetensors"))
    result, stdout, metrics = run_grpo(sft_ck, grpo_data, str(tmp_path / "grpo"), max_steps=2, beta=0.04, lr=1e-2)
    assert "LoRA r=4" in stdout and metrics[0]["kl"] > 0  # the reference is the base: the SFT adapter already moved
    after = load_file(str(tmp_path / "grpo" / "ckpt" / "adapter_model.safetensors"))
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
    with pytest.raises(SystemExit, match="not supported"):
        run_grpo(sft_ck, grpo_data, str(tmp_path / "moving"), ref_update_every=2, beta=0.04)


def test_fsdp_with_lora_equals_ddp(grpo_data, sft_data, tmp_path):  # noqa: F811
    """GRPO (the reference is the sharded policy with its adapters off: every rank runs each of its passes, token
    budget 1 so the ranks' counts differ; killed after step 1 and resumed) and SFT, --fsdp=1 against DDP, in fp64."""
    init = make_tiny_checkpoint(str(tmp_path / "init"), std=0.1, model_type="qwen3", attention_bias=False,
                                qk_norm=True, head_dim=16)
    grpo = dict(init_from=init, data=grpo_data[0], eval_every=0, max_steps=2, group_size=3, prompts_per_step=3,
                max_completion_len=16, progress=0, sample_every=0, warmup_steps=1, lr=1e-2, rewards="language:1",
                lora_rank=4, beta=0.04, dtype="float64", micro_batch_tokens=1, save_every=1)
    sft = dict(init_from=init, data=sft_data, max_seq_len=96, max_steps=3, lr=1e-2, warmup_steps=1, pack=0,
               batch_size=2, grad_accum=2, eval_frac=0.1, eval_every=2, progress=0, lora_rank=4, dtype="float64")
    for script, common, extra in (("train_grpo.py", grpo, dict(stop_after=1)), ("train_sft.py", sft, {})):
        args = [f"--{k}={v}" for k, v in common.items()]
        torchrun(script, args + [f"--out_dir={tmp_path / script / 'ddp'}"])
        fsdp = args + ["--fsdp=1", f"--out_dir={tmp_path / script / 'fsdp'}"]
        out = torchrun(script, fsdp + [f"--{k}={v}" for k, v in extra.items()])
        if extra:
            assert "resumed from" in torchrun(script, fsdp + ["--resume=1"])
        assert "FSDP2-sharded" in out
        a, b = (load_file(str(tmp_path / script / d / "ckpt" / "adapter_model.safetensors")) for d in ("ddp", "fsdp"))
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-10, script
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


def test_merge_lora_writes_a_plain_checkpoint(base, tmp_path):
    """merge_lora.py: the adapter merged into its base, a checkpoint transformers loads with the adapted logits."""
    import merge_lora

    path, _ = base
    ours = _random_adapter(path, tmp_path / "adapter")
    merge_lora.main([str(tmp_path / "adapter"), str(tmp_path / "merged")])
    files = os.listdir(tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= set(files) and not any(f.startswith("adapter_") for f in files)
    with torch.no_grad():
        torch.testing.assert_close(_fresh_hf(str(tmp_path / "merged"))(IDS).logits, ours.eval()(IDS), rtol=1e-5,
                                   atol=1e-5)


def test_distill_with_a_lora_student(tmp_path):
    args = [f"--data={os.path.join(os.path.dirname(train_sft.__file__), 'data/tiny/train.jsonl')}", "--n_prompts=16",
            "--eval_data=", "--max_steps=2", "--batch_size=2", "--progress=0", "--mode=logit", "--lora_rank=4",
            f"--out_dir={tmp_path / 'd'}"]
    assert distill.main(args)["finished"]
    conf = json.load(open(tmp_path / "d" / "ckpt" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == "data/tiny/student"


def test_the_7b_lora_recipe_runs_two_steps_of_its_shape_on_a_tiny_model(grpo_ckpt, grpo_data, tmp_path):  # noqa
    """config/r1zero_qwen2.5_7b_lora_math.py as it is (rank 16 on all linear layers, R1-Zero's template and rewards,
    beta with the base as reference, gradient checkpointing, a token budget) but for the model, data and sizes."""
    recipe = os.path.join(os.path.dirname(train_grpo.__file__), "config", "r1zero_qwen2.5_7b_lora_math.py")
    cfg = train_grpo.configure([recipe])
    assert (cfg.lora_rank, cfg.lora_targets, cfg.grad_checkpointing, cfg.beta > 0) == (16, "all-linear", 1, True)
    small = dict(init_from=grpo_ckpt, data=grpo_data[0], eval_data=grpo_data[1], eval_n=4, eval_every=2, max_steps=2,
                 prompts_per_step=2, max_prompt_len=480, max_completion_len=16, micro_batch_tokens=12 * 496,
                 out_dir=tmp_path / "run", progress=0, sample_every=0, save_every=0)
    result = train_grpo.main([recipe] + [f"--{k}={v}" for k, v in small.items()])
    assert result["step"] == 2
    conf = json.load(open(tmp_path / "run" / "ckpt" / "adapter_config.json"))
    assert conf["r"] == 16 and conf["target_modules"] == list(LORA_TARGETS)


def test_lora_flags_are_in_every_trainer():
    for module in (train_grpo, train_sft, distill):
        cfg = module.configure(["--lora_rank=16", "--lora_alpha=32", "--lora_targets=q_proj,v_proj", "--lora_base=x"])
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_base) == (16, 32, "q_proj,v_proj", "x")


def test_mfu_counts_no_weight_gradient_for_the_frozen_base(base):
    """6 FLOPs per trained weight a token, 4 per frozen one (forward + the input's gradient): LoRA is not 6N."""
    path, _ = base
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    attention = model.flops_per_token(64) - 6 * model.num_params()
    lora = add_lora(model, 4, 32)
    n_adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < n_adapters < lora.num_params() / 10
    assert lora.flops_per_token(64) == 4 * lora.num_params() + 2 * n_adapters + attention


def test_the_graph_path_samples_the_adapters_as_updated_in_place(base, monkeypatch):
    """CUDA graphs hold the addresses of the tensors they read; the optimizer updates the adapters in place, so the
    captured decode step samples the current adapters. On the CPU: the graph path's logic (capture replaced by a rerun
    on the same static buffers, as tests/test_sample.py does) against the plain path, after each of two updates."""
    from engine import Engine

    monkeypatch.setattr(Engine, "_capture", lambda self, step, restore: (step(), restore(), step)[-1])
    path, _ = base
    torch.manual_seed(0)
    model = add_lora(Transformer.from_pretrained(path, dtype=torch.float32), 4, 16)
    prompts, kw = [[1, 5, 17], [42, 99, 7, 3]], dict(num_samples=2, max_new_tokens=8, seed=3, ignore_eos=True)
    graphs, before = Engine(model, cuda_graphs=True), None
    assert graphs.static
    for _ in range(2):
        with torch.no_grad():  # an optimizer step: in place, the addresses kept
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        out, ref = graphs.generate(prompts, **kw), Engine(model).generate(prompts, **kw)
        rows = [(c.tokens, c.logprobs) for g in out for c in g]
        assert [c.tokens for g in ref for c in g] == [t for t, _ in rows]
        for (_, lp), c in zip(rows, (c for g in ref for c in g)):
            assert lp == pytest.approx(c.logprobs, abs=1e-5)
        assert rows != before  # the update changed what is sampled
        before = rows
