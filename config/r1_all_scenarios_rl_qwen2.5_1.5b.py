# R1 stage 4, RL for all scenarios: reasoning prompts keep the rule rewards (accuracy + format + language), general
# prompts (no answer field) are scored by a Bradley-Terry reward model trained with train_sft.py --mode=rm.
#   python sample.py --reject=1 --init_from=out/r1_rl_1.5b/ckpt --data=data/math/train.jsonl --num_samples=8 --out=out/reject/math.jsonl
#   python data/prepare_general.py --src=GENERAL_CHAT.jsonl --out=data/general/train.jsonl --n=200000 --tokenizer=/models/Qwen2.5-1.5B --max_tokens=4096
#   torchrun --standalone --nproc_per_node=8 train_sft.py --init_from=/models/Qwen2.5-1.5B --data=out/reject/math.jsonl:0.75,data/general/train.jsonl:0.25 --epochs=2 --lr=1e-5 --min_lr=1e-6 --max_seq_len=8192 --batch_size=1 --grad_accum=8 --out_dir=out/stage3_1.5b
#   torchrun --standalone --nproc_per_node=8 train_sft.py --mode=rm --init_from=out/stage3_1.5b/ckpt --data=PREFS.jsonl --epochs=1 --lr=1e-5 --min_lr=1e-6 --weight_decay=0 --batch_size=8 --out_dir=out/rm_1.5b
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/r1_all_scenarios_rl_qwen2.5_1.5b.py
init_from = "out/stage3_1.5b/ckpt"
data = "data/math/train.jsonl:0.4,data/gsm8k/train.jsonl:0.2,data/general/prompts.jsonl:0.4"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_rm_data = "data/general/test_prompts.jsonl"
eval_rm_n = 500
eval_every = 25
prompt_template = "chat"
rewards = "accuracy:1,format:0.2,language:0.1"
reward_model = "out/rm_1.5b/ckpt"
reward_model_weight = 1.0
group_size = 16
prompts_per_step = 64
minibatches = 2
micro_batch_tokens = 20480  # = 4 x (1024 + 4096): the padded size of 4 rollouts at the caps
micro_batch_size = 4  # the reward model's batch
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.001
max_prompt_len = 1024
max_completion_len = 4096
overlong = "mask"
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/r1_all_1.5b"
save_every = 25
