# DAPO (arXiv 2503.14476) on Qwen2.5-1.5B: clip-higher (0.2 / 0.28), token-level loss, dynamic sampling
# (all-equal groups dropped and refilled), soft overlong punishment, no KL term.
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/dapo_qwen2.5_1.5b_math.py --init_from=/models/Qwen2.5-1.5B
init_from = "/models/Qwen2.5-1.5B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "r1zero"
rewards = "accuracy:1"
group_size = 16
prompts_per_step = 64
minibatches = 4
micro_batch_tokens = 15360  # = 4 x (768 + 3072): the padded size of 4 rollouts at the caps
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 10
weight_decay = 0.1
beta = 0.0
clip_eps_low = 0.2
clip_eps_high = 0.28
loss_agg = "token"
dynamic_sampling = 1
max_sampling_rounds = 4
overlong = "soft"
overlong_buffer = 512
max_prompt_len = 768
max_completion_len = 3072
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/dapo_1.5b_math"
save_every = 25
