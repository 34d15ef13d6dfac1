# The quickstart, which is also train.py's defaults (python train.py == python train.py config/quickstart.py):
# a 1.3M-parameter model (4 layers, 128 wide, RoPE, 256-token context) on the Python standard
# library's source with a 4096-token BPE: 400 steps of 8192 tokens, the learning rate constant and
# then decaying linearly to 0 over the last 60% (WSD). About 5 minutes on 2 CPU cores, ending just
# under gzip -9 in bits per byte on the val text (1.64 against 1.65).
#   python prepare.py && python train.py && python sample.py
dataset = "stdlib"
tokenizer = "bpe:4096"
out_dir = "out/quickstart"
