# Tool-integrated reasoning RL from a base model, in ToRL's setting (arXiv 2503.23383): Qwen2.5-Math-1.5B (base),
# GRPO with the accuracy reward, the model writes ```python blocks that run in the sandbox (tools.py, sandbox.py) and
# reads their ```output; tool output is masked out of the loss. No SFT, no KL. Data: the MATH train split and
# MATH-500 as in config/r1zero_qwen2.5_1.5b_math.py's header.
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/tir_qwen2.5_1.5b_math.py --init_from=/models/Qwen2.5-Math-1.5B
#   python sample.py --init_from=out/tir_1.5b_math/ckpt --eval --data=data/math500/test.jsonl --prompt_template=tir \
#       --tools=python --tool_format=code --temperature=0 --max_new_tokens=3072 --out=out/eval/tir_math500.jsonl
init_from = "/models/Qwen2.5-Math-1.5B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "tir"
rewards = "accuracy:1"
tools = "python"
tool_format = "code"
max_tool_calls = 4
max_tool_output_tokens = 256
tool_timeout = 5.0
group_size = 8
prompts_per_step = 128
minibatches = 2
micro_batch_tokens = 15360  # = 4 x (768 + 3072): the padded size of 4 rollouts at the caps
max_steps = 300
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.0
max_prompt_len = 768
max_completion_len = 3072
temperature = 1.0
grad_checkpointing = 1
out_dir = "out/tir_1.5b_math"
save_every = 25
