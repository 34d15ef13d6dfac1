# SmolLM2-135M's Llama-style architecture: RMSNorm, SwiGLU, RoPE, grouped-query attention
# (9 query heads, 3 key/value heads), tied embeddings. From scratch on FineWeb 10B with
# GPT-2's tokenizer (8 GPUs):
#   python prepare.py config/smollm2_135m.py && torchrun --standalone --nproc_per_node=8 train.py config/smollm2_135m.py
# Or fine-tune the pretrained weights, on data in SmolLM2's own tokenizer (the model's
# shape then comes from its config.json):
#   python prepare.py --dataset=tinystories --tokenizer=HuggingFaceTB/SmolLM2-135M
#   python train.py config/smollm2_135m.py --init_from=HuggingFaceTB/SmolLM2-135M --dataset=tinystories \
#       --tokenizer=HuggingFaceTB/SmolLM2-135M --learning_rate=1e-4 --min_lr=1e-5 --max_steps=1000 --out_dir=out/smollm2_ft
dataset = "fineweb10B"
tokenizer = "gpt2"
num_shards = 103
out_dir = "out/smollm2_135m"
n_layer = 30
n_head = 9
n_kv_head = 3
n_embd = 576
mlp_hidden = 1536
block_size = 2048
norm = "rmsnorm"
mlp = "swiglu"
pos = "rope"
rope_theta = 100000.0
bias = False
tie_embeddings = True
doc_mask = True
total_batch_size = 524288
micro_batch = 16  # 16 x 2048 per GPU; 8 GPUs and 2 micro-steps make a step
learning_rate = 3e-3
# AdamW, SmolLM2's recipe. Muon (--optimizer=muon, --muon_lr=0.02) is an option from
# scratch, measured here on the quickstart only (docs/quickstart_trials.md).
optimizer = "adamw"
value_embeds = False  # SmolLM2's architecture; the quickstart's value embeddings are a setting to try
min_lr = 0.0
warmup_steps = 700
max_steps = 18865
schedule = "wsd"
decay_frac = 0.2
weight_decay = 0.1
eval_interval = 250
eval_tokens = 10_485_760
log_interval = 10
ckpt_interval = 2000
