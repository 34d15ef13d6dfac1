# The quickstart, which is also train.py's defaults (python train.py == python train.py config/quickstart.py):
# a 2.4M-parameter model (4 layers, 128 wide, RoPE, 256-token context; 1.05M of the weights are
# value embeddings) on the Python standard library's source with a 4096-token BPE: 720 steps of
# 4096 tokens with Muon for the blocks' matrices and AdamW at 2e-2 for the rest, the learning
# rates constant and then decaying linearly to 0 over the last 60% (WSD). 720 such steps cost
# the time of the 400 AdamW steps of 8192 tokens that it had before, and end at 1.314 bits per
# byte on the val text against AdamW's 1.671 (gzip -9: 1.654, bzip2 -9: 1.47, xz -9e: 1.41):
# every trial is in docs/quickstart_trials.md. The loss runs 1024 tokens at a time (loss_chunk,
# train.py's default): as fast as all at once here, with a fifth less memory a step (python
# bench.py memory); activation checkpointing stays off, as it costs 15% of the speed.
#   python prepare.py && python train.py && python sample.py
dataset = "stdlib"
tokenizer = "bpe:4096"
out_dir = "out/quickstart"
