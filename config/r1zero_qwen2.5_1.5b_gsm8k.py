# R1-Zero on Qwen2.5-1.5B (base, no SFT): GRPO with accuracy + format rewards on GSM8K, R1-Zero's template.
# Published reference point (SimpleRL-Zoo, Zeng et al. 2025, arXiv 2503.18892): GSM8K 55.7 -> 74.4 for this model.
#   python data/prepare_gsm8k.py
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/r1zero_qwen2.5_1.5b_gsm8k.py --init_from=/models/Qwen2.5-1.5B
init_from = "/models/Qwen2.5-1.5B"
data = "data/gsm8k/train.jsonl"
eval_data = "data/gsm8k/test.jsonl"
eval_n = 1319
eval_every = 25
prompt_template = "r1zero"
rewards = "accuracy:1,format_answer:0.5"
group_size = 8
prompts_per_step = 128
minibatches = 2
micro_batch_tokens = 12288  # = 8 x (512 + 1024): the padded size of 8 rollouts at the caps
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.001
max_prompt_len = 512
max_completion_len = 1024
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/r1zero_1.5b_gsm8k"
save_every = 25
