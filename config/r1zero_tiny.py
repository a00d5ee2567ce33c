# R1-Zero in miniature: pure RL (GRPO) straight from the tiny zero base (data/tiny/zero_base, pretrained only; no SFT),
# with R1-Zero's plain-text template (DeepSeek-R1, arXiv 2501.12948, Table 1) and rule rewards only: accuracy of the
# answer in <answer> plus the format reward for <think> ... </think> <answer> ... </answer> (sec. 2.2.2). No KL.
# The base has read questions answered outright in every layout and worked out in three of ten: greedy, it guesses
# under the template and in every layout it has read (8.6% at best, 3.6% one-shot); sampled, it works a quarter of the
# problems out, 69% of them right. 100 steps of 16 prompts x 16 samples, evaluated greedily every 25, make the working
# its habit (held-out 5.6% -> 83.8%, completions 20.6 -> 60.1 tokens; about 8 min on 2 CPU cores). Nothing rewards
# the base's rare checks of a step (`Check: 24-8=16`): they would have to pay through the answer, and do not yet.
#   python train_grpo.py config/r1zero_tiny.py
init_from = "data/tiny/zero_base"
prompt_template = "r1zero"
rewards = "accuracy:1,format_answer:0.5"
beta = 0.0
max_completion_len = 128
max_steps = 100
eval_every = 25
lr = 5e-5
min_lr = 1e-5
out_dir = "out/r1zero_tiny"
