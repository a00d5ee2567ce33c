# Reasoning RL with tools on Qwen3-1.7B (post-trained, thinking on, its own chat format): the prompts list the python
# tool's schema in the system turn, the model calls it with <tool_call> JSON inside its turns and reads the result as
# a `tool` turn, exactly as Qwen3's chat template renders them (tokenizer.py); tool turns are masked out of the loss.
# Data: MATH as in config/r1zero_qwen2.5_1.5b_math.py's header (rows with `messages` carry the \boxed instruction).
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/tools_qwen3_1.7b_math.py --init_from=/models/Qwen3-1.7B
init_from = "/models/Qwen3-1.7B"
data = "data/math/train.jsonl"
eval_data = "data/math500/test.jsonl"
eval_n = 500
eval_every = 25
prompt_template = "chat"
rewards = "accuracy:1"
tools = "python"
tool_format = "chat"
max_tool_calls = 4
max_tool_output_tokens = 256
tool_timeout = 5.0
group_size = 8
prompts_per_step = 64
minibatches = 2
micro_batch_tokens = 10240  # = 2 x (1024 + 4096): the padded size of 2 rollouts at the caps
max_steps = 200
lr = 1e-6
min_lr = 1e-6
warmup_steps = 5
beta = 0.0
max_prompt_len = 1024
max_completion_len = 4096
temperature = 0.6
top_p = 0.95
grad_checkpointing = 1
out_dir = "out/tools_qwen3_1.7b_math"
save_every = 25
