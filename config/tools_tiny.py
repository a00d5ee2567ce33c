# Tool use in miniature: GRPO from the tiny tool cold start (data/tiny/tool_start: 20% of its SFT traces call the
# calculator, the rest work in their head) with the accuracy reward and the calculator on, in Qwen's chat format
# (<tool_call> JSON, answered by a tool turn; no schemas in the prompt, as in its SFT data). Tool turns are masked out
# of the loss. The run ends with held-out accuracy and tool use (greedy, tools on), before -> after: 6.2% -> 90.2%
# and 0% -> 100% (about 6 min on 2 CPU cores).
#   python train_grpo.py config/tools_tiny.py
init_from = "data/tiny/tool_start"
tools = "calculator"
tool_format = "chat"
tools_in_prompt = 0
rewards = "accuracy:1"
max_completion_len = 160
max_steps = 60
eval_every = 20
out_dir = "out/tools_tiny"
