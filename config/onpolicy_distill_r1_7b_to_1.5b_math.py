# On-policy distillation after sequence distillation: DeepSeek-R1-Distill-Qwen-1.5B samples, R1-Distill-Qwen-7B (the
# same tokenizer, a head padded the same or differently) scores its tokens, the student minimises the per-token reverse
# KL. Only teacher forward passes: far cheaper per step than teacher generation.
#   torchrun --standalone --nproc_per_node=8 distill.py config/onpolicy_distill_r1_7b_to_1.5b_math.py
mode = "onpolicy"
teacher = "/models/DeepSeek-R1-Distill-Qwen-7B"
init_from = "/models/DeepSeek-R1-Distill-Qwen-1.5B"
data = "data/math/train.jsonl"
n_prompts = 0
eval_data = "data/math500/test.jsonl"
eval_n = 500
prompts_per_step = 64
samples_per_prompt = 4
max_new_tokens = 4096
temperature = 1.0
micro_batch_size = 2
max_steps = 150
lr = 1e-6
min_lr = 1e-7
warmup_steps = 5
weight_decay = 0.0
eval_every = 25
out_dir = "out/onpolicy_1.5b"
save_every = 25
