# R1-Zero on Qwen2.5-7B (base) with LoRA on one 80 GB GPU: GRPO with accuracy + format rewards on MATH, held out on
# MATH-500, R1-Zero's template. Rank 16 on every linear layer of every block (LoRA Without Regret, Thinking Machines
# Lab 2025: in RL small ranks match full fine-tuning, all-linear beats attention-only, the best learning rate is about
# 10x full fine-tuning's 1e-6). The reference for the KL term is the base itself, the adapters switched off.
# Full fine-tuning of this model from its base, R1-Zero style, is reported in SimpleRL-Zoo (arXiv 2503.18892).
#   python data/prepare_math500.py                                          # -> data/math500/test.jsonl
#   python data/prepare_math500.py --src=MATH_train.jsonl --out=data/math   # the MATH train split, same fields
#   mv data/math/test.jsonl data/math/train.jsonl
#   python train_grpo.py config/r1zero_qwen2.5_7b_lora_math.py --init_from=/models/Qwen2.5-7B
#   python merge_lora.py out/r1zero_7b_lora_math/ckpt out/r1zero_7b_lora_math/merged   # for vLLM without adapters
#
# Memory plan (Qwen2.5-7B: 7.62B parameters, hidden 3584, 28 layers, 4 KV heads of 128, vocab 152064, untied):
#   base, frozen, bf16 (no fp32 master copy):            7.62e9 x 2 B                                      15.2 GB
#   adapters r=16 fp32 + gradients + AdamW m and v:     28 x 1,441,792 = 40.4M params x (4+4+8) B           0.6 GB
#   KV cache (bf16, kept across steps for CUDA graphs):  128 rows x 2048 positions x 57,344 B/token         15.0 GB
#     (2 x 28 layers x 4 heads x 128 x 2 B = 56 KiB a token; 16 prompts x 8 samples, prompt 512 + completion 1536)
#   update, per micro-batch of micro_batch_tokens = 24576 padded tokens (12 rollouts at the caps):
#     with gradient checkpointing: each block's input kept, 28 x 3584 x 2 B = 200 KB a token                4.9 GB
#       + one block recomputed at a time (attention and SwiGLU activations, ~195 KB a token)               4.8 GB
#     without: every block's activations kept, 28 x ~395 KB a token                                      ~270 GB
#   log-prob chunk: logp_chunk 1024 positions x 152064 x 4 B (never [batch, seq, vocab])                    0.6 GB
#   sampling: [128, 152064] fp32 logits and log-softmax buffer                                             0.2 GB
#   total ~41 GB with checkpointing, leaving room for the allocator's fragmentation and CUDA's workspaces; if
#   peak_mem_mb stays well under 80 GB, raise micro_batch_tokens (each 2048 tokens adds ~0.8 GB).
init_from = "/models/Qwen2.5-7B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "r1zero"
rewards = "accuracy:1,format_answer:0.5"
lora_rank = 16
lora_alpha = 32
lora_targets = "all-linear"
group_size = 8
prompts_per_step = 16
minibatches = 1
micro_batch_tokens = 24576  # = 12 x (512 + 1536): the padded size of 12 rollouts at the caps (the plan above)
max_steps = 400
lr = 1e-5
min_lr = 1e-5
warmup_steps = 5
beta = 0.001
max_prompt_len = 512
max_completion_len = 1536
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/r1zero_7b_lora_math"
save_every = 25
