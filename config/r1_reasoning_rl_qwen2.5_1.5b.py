# R1 stage 2, reasoning-oriented RL after a cold start: the chat template, accuracy + format + R1's
# language-consistency reward (the proportion of English words in the CoT, added to the accuracy reward).
# Before it, stage 1 (the cold start): long-CoT traces (JSONL) in R1's <think> format, then SFT of the base; the data
# below come from data/prepare_gsm8k.py and the MATH commands in config/r1zero_qwen2.5_1.5b_math.py's header.
#   python data/prepare_coldstart.py --src=LONG_COT.jsonl --out=data/coldstart_1.5b.jsonl
#   torchrun --standalone --nproc_per_node=8 train_sft.py --init_from=/models/Qwen2.5-1.5B --data=data/coldstart_1.5b.jsonl --epochs=2 --lr=1e-5 --min_lr=1e-6 --max_seq_len=8192 --batch_size=1 --grad_accum=8 --out_dir=out/cold_1.5b
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/r1_reasoning_rl_qwen2.5_1.5b.py --init_from=out/cold_1.5b/ckpt
init_from = "out/cold_1.5b/ckpt"
data = "data/math/train.jsonl:0.5,data/gsm8k/train.jsonl:0.5"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "chat"
rewards = "accuracy:1,format:0.2,language:0.1"
group_size = 16
prompts_per_step = 64
minibatches = 2
micro_batch_tokens = 19456  # = 4 x (768 + 4096): the padded size of 4 rollouts at the caps
max_steps = 400
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.001
max_prompt_len = 768
max_completion_len = 4096
overlong = "mask"
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/r1_rl_1.5b"
save_every = 25
