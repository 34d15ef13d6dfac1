# GPT-2 small (124M) on FineWeb 10B, the llm.c / nanoGPT recipe: 8 GPUs, 2^19 (~0.5M) tokens a step.
#   python prepare.py config/gpt2_small.py        # downloads 103 shards of llm.c's GPT-2 tokens (~20 GB), and the evals
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_small.py
dataset = "fineweb10B"
tokenizer = "gpt2"
num_shards = 103  # prepare.py: all of FineWeb 10B
out_dir = "out/gpt2_small"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
pos = "learned"  # GPT-2's learned positions (train.py's default is RoPE)
total_batch_size = 524288
micro_batch = 64  # 64 x 1024 tokens per GPU per micro-step: 8 GPUs fill a step without accumulation
# the head and loss 1024 tokens at a time (train.py's default, said here as the reason is this
# model's): all 64 x 1024 x 50304 logits would take 13 GB in fp32, and their gradient as much again.
# On a CPU at 8 x 1024 it cut the loss's peak 4.6x and the step's time 1.2x (bench.py memory);
# on a GPU not measured yet. Activation checkpointing (off) cost 4% there: for longer contexts.
loss_chunk = 1024
activation_checkpointing = False
learning_rate = 6e-4
# AdamW, as llm.c and nanoGPT ran this recipe. Muon is an option (--optimizer=muon): the
# speedrun's GPT-2 runs used it for the hidden matrices with momentum 0.95 and a peak lr of
# about 0.05 (--muon_lr=0.05), AdamW keeping the rest. Measured here on the quickstart
# only; on this model and a GPU, not yet.
optimizer = "adamw"
value_embeds = False  # GPT-2's architecture; the quickstart's value embeddings are a setting to try
min_lr = 0.0
warmup_steps = 700
schedule = "cosine"
max_steps = 18865  # ~9.9B tokens, one pass over the data, as llm.c
weight_decay = 0.1
eval_interval = 250
# downstream evals (evals.py), prepared by prepare.py with the data: HellaSwag and CORE's 22
# tasks every 2000 steps and at the end, split over the GPUs; their scores go to log.jsonl
evals = "hellaswag,core"
evals_interval = 2000
eval_tokens = 10_485_760  # 20 micro-steps of the 8 GPUs
log_interval = 10
ckpt_interval = 2000
