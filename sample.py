"""
sample.py: generates text from a trained checkpoint or a pretrained model, streaming it.

    python sample.py                                     # from out/quickstart/ckpt.pt
    python sample.py --out_dir=out/tinystories --start="Once upon a time" --top_p 0.9
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --num_samples=3 --temperature=0
    python sample.py --out_dir=out/chat --chat                 # talk to a model tuned on conversations

All samples are generated in one batch through model.py's KV cache; the first streams
to stdout as it is generated, the others follow. Each stops at the end-of-text token.
Special-token text in the prompt (such as <|endoftext|>) becomes that special token.
With --chat, each line you type is a user's turn, and the model's reply streams back,
ending at <|im_end|>; the conversation so far (ChatML, bpe.render_chat) is the prompt,
its oldest turns dropped once it outgrows the block. /reset starts over, /exit (or
end of input) quits. Piped in, the lines are read in turn: echo hi | python sample.py --chat
Read next: checkpoint.py, the checkpoint format, and the export to Hugging Face.
"""
import sys
import time

import torch

import bpe
import checkpoint
import model
import prepare
from config import check, configure

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (config/__init__.py)
out_dir = "out/quickstart"
init_from = "resume"  # "resume": out_dir/ckpt.pt; a checkpoint file or run directory; a pretrained name or directory
start = ""  # the prompt; FILE:path reads it from a file; "" starts a new document
num_samples = 2
max_new_tokens = 200
temperature = 0.8  # 0 is greedy
top_k = 0  # 0: off
top_p = 1.0  # 1.0: off
stop_at_eot = True
chat = False  # a conversation: your lines and the model's replies, in ChatML
system = ""  # with chat: the system message that starts every conversation; "": none
seed = 1337
device = ""  # "" picks cuda, then mps, then cpu
dtype = ""  # "" picks bf16 on CUDA, fp32 elsewhere


def check_settings():
    check([("num_samples", num_samples, num_samples >= 1, "1 or more"),
           ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "1 or more"),
           ("temperature", temperature, 0 <= temperature < float("inf"), "0 (greedy) or more"),
           ("top_k", top_k, top_k >= 0, "0 (off) or more"),
           ("top_p", top_p, 0 <= top_p <= 1, "0 to 1 (1: off)"),
           ("dtype", dtype, dtype in ("", *model.DTYPES), f"one of {('', *model.DTYPES)}")])

# -----------------------------------------------------------------------------


def read_prompt(enc):
    """The prompt's ids; an empty prompt starts a new document at the end-of-text token."""
    prompt = start
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: start=FILE:{prompt[5:]}: cannot read it ({type(e).__name__}: "
                             f"{getattr(e, 'strerror', None) or e})") from None
    eot = enc.eot_token if bpe.EOT in enc.special_tokens_set else None
    ids = enc.encode(prompt, allowed_special="all") if prompt else [eot] if eot is not None else []
    if not ids:
        raise SystemExit("error: the prompt is empty, and this tokenizer has no end-of-text token to start from")
    return prompt, ids, eot


def talk(m, enc, dev, gen):
    """The chat: each line a user's turn, each reply streamed as it is generated."""
    lines, out = sys.stdin, sys.stdout
    end, interactive = enc.encode_single_token(bpe.IM_END), lines.isatty()
    history = []
    print(f"(chat: {m.cfg.block_size} tokens of context; /reset starts over, /exit quits)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=out, flush=True)
        line = lines.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            print("(a new conversation)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if not interactive:  # piped in: the transcript shows both sides
            print(f"you> {line.rstrip()}", file=out)
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = conversation(enc, history, m.cfg.block_size - min(max_new_tokens, m.cfg.block_size // 2))
        reply, stream = [], bpe.StreamDecoder(enc)
        print("assistant> ", end="", file=out, flush=True)
        for token in m.generate_tokens(torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k or None,
                                       top_p, None, gen):
            t = int(token[0])
            if t in (end, enc.eot_token):  # its turn is over
                break
            reply.append(t)
            print(stream.push([t]), end="", file=out, flush=True)
        print(stream.flush(), file=out, flush=True)
        history.append({"role": "assistant", "content": enc.decode(reply)})


def conversation(enc, history, room):
    """The prompt for the next reply: the system message, then as many of the latest turns
    as fit in `room` tokens (the oldest dropped a pair at a time); the last turn alone is
    cut to its end if even it does not fit."""
    head = [{"role": "system", "content": system}] if system else []
    turns = history
    while len(turns) > 1:
        ids = bpe.render_chat(enc, head + turns, generation=True)[0]
        if len(ids) <= room:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # a user's turn and the reply to it
        print("(the conversation outgrew the block: its oldest turns are dropped)", file=sys.stderr)
    return bpe.render_chat(enc, head + turns, generation=True)[0][-room:]


def main():
    configure(globals())
    check_settings()
    dev = model.pick_device(device)
    # a checkpoint's model (LoRA adapters merged into their base: the same logits, at the
    # base's speed; a sharded one put together whole), or pretrained weights
    m, spec, _ = checkpoint.load_model(init_from, out_dir)
    enc = checkpoint.tokenizer(spec, where=init_from)  # a trained tokenizer travels inside the checkpoint
    m.to(dev, model.pick_dtype(dev, dtype)).eval()
    if chat:
        if not {bpe.IM_START, bpe.IM_END} <= enc.special_tokens_set:
            raise SystemExit(f"error: --chat needs a model tuned on conversations: {init_from}'s tokenizer has no "
                             f"{bpe.IM_END} (fine-tune it on a chat dataset: README, Talk to it)")
        return talk(m, enc, dev, torch.Generator(device=dev).manual_seed(seed))
    prompt, ids, eot = read_prompt(enc)
    window = m.cfg.block_size
    if len(ids) > window:
        print(f"(the prompt has {len(ids)} tokens; only its last {window}, the block size, are kept)", file=sys.stderr)
        ids = ids[-window:]
    idx = torch.tensor([ids] * num_samples, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    stop = eot if stop_at_eot else None

    out, stream, t0 = [], bpe.StreamDecoder(enc), time.time()
    print("-" * 20, "sample 1", "-" * 20)
    print(prompt, end="", flush=True)
    for token in m.generate_tokens(idx, max_new_tokens, temperature, top_k or None, top_p, stop, gen):
        out.append(token.tolist())
        if out[-1][0] != eot:
            print(stream.push([out[-1][0]]), end="", flush=True)
    print(stream.flush())
    elapsed = time.time() - t0
    for i in range(1, num_samples):
        tokens = [step[i] for step in out]
        tokens = tokens[:tokens.index(eot)] if eot in tokens else tokens
        print("-" * 20, f"sample {i + 1}", "-" * 20)
        print(prompt + enc.decode_bytes(tokens).decode("utf-8", errors="replace"))
    n = len(out) * num_samples
    print(f"{n} tokens in {elapsed:.2f}s: {n / elapsed:.1f} tokens/s ({num_samples} samples in one batch, {dev})",
          file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, prepare.DownloadError) as e:
        raise SystemExit(f"sample.py: error: {e}") from None
