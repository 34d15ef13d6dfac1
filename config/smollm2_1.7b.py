# SmolLM2-1.7B's shape (24 Llama blocks, 2048 wide, 32 heads, SwiGLU 8192, RoPE theta
# 130000, tied embeddings), from scratch on FineWeb 10B with GPT-2's tokenizer: 1.71B
# weights. Sharded across 8 GPUs (parallel="fsdp"):
#   python prepare.py config/smollm2_1.7b.py && torchrun --standalone --nproc_per_node=8 train.py config/smollm2_1.7b.py
#
# Why sharded: the memory per GPU, in bytes per weight (P = 1.71e9), before activations
#                                          DDP            FSDP on 8 GPUs
#   fp32 weights                           4              4 / 8
#   fp32 gradients                         4 (+4 buckets) 4 / 8, but 4 between micro-steps*
#   AdamW's two moments, fp32              8              8 / 8
#   bf16 weights being computed with       2              2 for two blocks at a time (~0.3 GB)
#   total                                  22 P = 38 GB   2 P + 4 P* = 10 GB (3.7 GB without accumulation)
# * the step's gradients accumulate, whole and fp32, until its last micro-step reduce-scatters them.
# Activations come on top, the same under both: about 5 GB per sequence of 2048 tokens
# (24 blocks of ~40 bytes x 2048 x 2048 in bf16, and the 49152-wide logits), so 40 GB at
# micro_batch 8: about 78 GB per GPU under DDP, the whole of an H100's 80 GB, and 50 GB
# under FSDP. At start every process builds the whole fp32 model in CPU memory (6.8 GB
# each, 55 GB on the node) before sharding it. On several nodes, out_dir must be on a
# filesystem they all share: every process writes its shard of each checkpoint there.
dataset = "fineweb10B"
tokenizer = "gpt2"
num_shards = 103
out_dir = "out/smollm2_1.7b"
parallel = "fsdp"
n_layer = 24
n_head = 32
n_kv_head = 32
n_embd = 2048
mlp_hidden = 8192
block_size = 2048
norm = "rmsnorm"
mlp = "swiglu"
pos = "rope"
rope_theta = 130000.0
bias = False
tie_embeddings = True
doc_mask = True
total_batch_size = 1048576  # 2^20 tokens: 8 micro-steps of 8 x 2048 on each of 8 GPUs
micro_batch = 8
learning_rate = 5e-4
optimizer = "adamw"  # sharded (FSDP): Muon needs whole matrices
value_embeds = False  # SmolLM2's architecture
min_lr = 0.0
warmup_steps = 700
max_steps = 9500  # ~10B tokens, one pass over the data
schedule = "wsd"
decay_frac = 0.2
weight_decay = 0.1
eval_interval = 250
eval_tokens = 10_485_760
log_interval = 10
ckpt_interval = 1000
