# R1's distillation (sequence mode): a strong reasoner's filtered samples -> SFT of a small base model, as
# DeepSeek-R1-Distill-Qwen-1.5B was made from Qwen2.5-Math-1.5B (with R1 itself, 800k samples, as the teacher).
# Sequence mode works across tokenizers (the student reads the samples as text).
#   torchrun --standalone --nproc_per_node=8 distill.py config/distill_r1_7b_to_qwen2.5_math_1.5b.py
mode = "sequence"
teacher = "/models/DeepSeek-R1-Distill-Qwen-7B"
init_from = "/models/Qwen2.5-Math-1.5B"
data = "data/math/train.jsonl:0.7,data/gsm8k/train.jsonl:0.3"
n_prompts = 0
eval_data = "data/math500/test.jsonl"
eval_n = 500
num_samples = 4
max_per_prompt = 1
prefer = "shortest"
temperature = 0.6
max_new_tokens = 8192
gen_batch_size = 64
epochs = 2.0
batch_size = 1
max_seq_len = 16384
lr = 1e-5
min_lr = 1e-6
warmup_steps = 20
weight_decay = 0.0
out_dir = "out/distill_1.5b"
save_every = 200
