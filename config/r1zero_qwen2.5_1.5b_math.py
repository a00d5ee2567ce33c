# R1-Zero on Qwen2.5-1.5B (base) on MATH, held out on MATH-500; longer completions than GSM8K.
# Published reference point (SimpleRL-Zoo, Zeng et al. 2025, arXiv 2503.18892): MATH-500 29.6 -> 59.0 for this model.
#   python data/prepare_math500.py                                          # -> data/math500/test.jsonl
#   python data/prepare_math500.py --src=MATH_train.jsonl --out=data/math   # the MATH train split, same fields
#   mv data/math/test.jsonl data/math/train.jsonl
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/r1zero_qwen2.5_1.5b_math.py --init_from=/models/Qwen2.5-1.5B
init_from = "/models/Qwen2.5-1.5B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "r1zero"
rewards = "accuracy:1,format_answer:0.5"
group_size = 8
prompts_per_step = 128
minibatches = 2
micro_batch_tokens = 15360  # = 4 x (768 + 3072): the padded size of 4 rollouts at the caps
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.001
max_prompt_len = 768
max_completion_len = 3072
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/r1zero_1.5b_math"
save_every = 25
