# A small GPT on TinyStories (GPT-2's tokenizer): fluent stories on one GPU in minutes.
#   python prepare.py config/tinystories.py && python train.py config/tinystories.py
#   python sample.py --out_dir=out/tinystories --start="Once upon a time"
dataset = "tinystories"
tokenizer = "gpt2"
out_dir = "out/tinystories"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 512
doc_mask = True  # stories are short: keep each one to itself
total_batch_size = 131072
micro_batch = 32
learning_rate = 1e-3
# AdamW, as this config was tuned; Muon (--optimizer=muon) is measured on the quickstart only.
optimizer = "adamw"
value_embeds = False  # as this config was tuned
min_lr = 1e-4
warmup_steps = 200
max_steps = 5000
schedule = "wsd"
decay_frac = 0.2
eval_interval = 500
eval_tokens = 1_048_576
log_interval = 20
ckpt_interval = 1000
