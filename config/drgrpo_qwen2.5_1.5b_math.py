# Dr. GRPO (arXiv 2503.20783) on Qwen2.5-1.5B: no per-completion length normalisation (token sum / constant
# max_completion_len) and no std division of the advantage; no KL term; R1-Zero template.
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/drgrpo_qwen2.5_1.5b_math.py --init_from=/models/Qwen2.5-1.5B
init_from = "/models/Qwen2.5-1.5B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "r1zero"
rewards = "accuracy:1"
group_size = 8
prompts_per_step = 128
minibatches = 2
micro_batch_tokens = 15360  # = 4 x (768 + 3072): the padded size of 4 rollouts at the caps
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.0
loss_agg = "constant"
scale_rewards = "none"
max_prompt_len = 768
max_completion_len = 3072
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/drgrpo_1.5b_math"
save_every = 25
