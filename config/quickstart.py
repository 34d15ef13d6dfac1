# The quickstart, which is also train.py's defaults (python train.py == python train.py config/quickstart.py):
# a 2.6M-parameter model (4 layers, 192 wide, RoPE, 512-token context) on the Python standard
# library's source with a 4096-token BPE, 200 steps of 8192 tokens: under 5 minutes on 2 CPU cores.
#   python prepare.py && python train.py && python sample.py
dataset = "stdlib"
tokenizer = "bpe:4096"
out_dir = "out/quickstart"
