"""
train.py: trains a GPT on prepare.py's shards, on a CPU, one GPU, or many (DDP).

    python train.py                                   # the quickstart: a small model on data/stdlib
    python train.py config/tinystories.py --max_steps=2000
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_small.py
    python train.py config/x.py --init_from=resume    # continue out_dir/ckpt.pt

Each step sees total_batch_size tokens: micro-batches of micro_batch sequences of
block_size tokens on every process, accumulated until the step is full. Logs go to
stdout and out_dir/log.jsonl; checkpoints to out_dir/ckpt.pt (and on Ctrl-C or SIGTERM).
Read next: sample.py
"""
import contextlib
import ctypes
import dataclasses
import gzip
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import prepare
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (prepare.configure)
# data
dataset = "stdlib"
tokenizer = ""  # what prepare.py used (a config file names it for both scripts); "" = the dataset's default
data_dir = "data"
out_dir = "out/quickstart"
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or a pretrained name or directory
# model (GPTConfig; the vocab size comes from the data)
n_layer = 4
n_head = 4
n_kv_head = 0
n_embd = 128
mlp_hidden = 0
block_size = 256
norm = "layernorm"
mlp = "gelu"
pos = "rope"
rope_theta = 10000.0
bias = True
tie_embeddings = True
attn = "auto"
doc_mask = False  # attend only within documents (end-of-text tokens start them)
# batch: total_batch_size tokens a step = micro_batch * block_size * processes * accumulation
total_batch_size = 8192
micro_batch = 8
# optimizer: AdamW; warmup, then cosine or WSD (warmup-stable-decay) down to min_lr
learning_rate = 5e-3
min_lr = 0.0
warmup_steps = 20
max_steps = 400
schedule = "wsd"  # or "cosine"
decay_frac = 0.6  # WSD: the last fraction of the steps decays linearly
weight_decay = 0.1
decay_embeddings = False
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# running
device = ""  # "" picks cuda, then mps, then cpu
dtype = ""  # "" picks bf16 on CUDA (fp16 where bf16 is missing), fp32 elsewhere
compile = None  # None: on CUDA only
eval_interval = 200
eval_tokens = 170000  # the fixed slice of val tokens each evaluation reads (about all of stdlib's)
log_interval = 10
ckpt_interval = 0  # 0: checkpoint only at the end (and on a signal)
seed = 1337
max_bad_steps = 5  # non-finite losses in a row before training stops

# -----------------------------------------------------------------------------
# Data: shards streamed in order, each process reading its own slice of every step


class Shards:
    """Micro-batches x, y (B, T) from a split's shards. A shard is cut into sequences of
    T + 1 tokens (overlapping by one: y is x shifted) and, when shuffle, read in a fixed
    random order (seeded by seed, shard and pass), so that a step mixes text from all over
    the shard rather than one file of a sorted corpus; nothing is drawn twice in a pass.
    Every micro-step takes the next B * world sequences; process `rank` gets its B of them.
    The position (shard, sequence, pass) goes into checkpoints; after the last shard the
    next pass starts."""

    def __init__(self, directory, split, B, T, rank, world, shuffle, state=None):
        self.files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                            if f.startswith(split + "_") and f.endswith(".bin"))
        if not self.files:
            raise SystemExit(f"error: no {split}_*.bin shards in {directory}; run prepare.py first")
        self.B, self.T, self.rank, self.world, self.shuffle = B, T, rank, world, shuffle
        self.shard, self.pos, self.epoch = (state["shard"], state["pos"], state["epoch"]) if state else (0, 0, 0)
        self._load()

    def _load(self):
        self.tokens = prepare.read_shard(self.files[self.shard])
        n = (len(self.tokens) - 1) // self.T
        if n < self.B * self.world:
            raise SystemExit(f"error: {self.files[self.shard]} has {len(self.tokens)} tokens, fewer than one "
                             f"micro-step needs ({self.B * self.world} x {self.T} + 1); lower micro_batch or block_size")
        self.order = np.random.default_rng([seed, self.shard, self.epoch]).permutation(n) if self.shuffle \
            else np.arange(n)

    def next(self):
        if self.pos + self.B * self.world > len(self.order):  # this shard is used up: the next one
            self.shard, self.pos = (self.shard + 1) % len(self.files), 0
            self.epoch += self.shard == 0
            self._load()
        mine = self.order[self.pos + self.rank * self.B:self.pos + (self.rank + 1) * self.B]
        buf = torch.from_numpy(np.stack([self.tokens[i * self.T:(i + 1) * self.T + 1] for i in mine]).astype(np.int64))
        self.pos += self.B * self.world
        return buf[:, :-1], buf[:, 1:]

    def state(self):
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch}


# -----------------------------------------------------------------------------
# Learning rate, MFU


def lr_at(step):
    """Linear warmup to learning_rate, then cosine, or constant then a linear decay
    over the last decay_frac of the steps (WSD), down to min_lr at max_steps."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_start = max_steps * (1 - decay_frac)
        frac = max(0.0, (step - decay_start) / max(1.0, max_steps - decay_start))
        return learning_rate - (learning_rate - min_lr) * min(frac, 1.0)
    frac = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * frac))


# dense bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("4090", 165e12), ("V100", 125e12)]


def peak_flops(dev):
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def keep_freed_memory():
    """Speed trick for training on a CPU under Linux: glibc gives big freed blocks (the
    logits and their gradients, tens of MB) back to the OS, and the next step's tensors
    page-fault them in again, which cost the quickstart about a fifth of each step. This
    keeps them in the heap for reuse instead, as jemalloc or tcmalloc would."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): nothing to tune
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap
    libc.mallopt(-3, 2 ** 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GB from the heap


def model_config(vocab_size):
    """The GPTConfig of these settings: the model settings above are GPTConfig's fields."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    return GPTConfig(vocab_size=vocab_size, **{k: v for k, v in globals().items() if k in fields})

# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, raw_model, optimizer, scaler, step, loader, settings, tokenizer_spec):
    """Everything needed to continue exactly, written atomically (a temp file, then a rename)."""
    ckpt = {"model": raw_model.state_dict(), "model_config": dataclasses.asdict(raw_model.cfg),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "data": loader.state(), "settings": settings, "tokenizer": tokenizer_spec,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def tokenizer_spec(directory, name):
    """What sample.py needs to decode: "gpt2", or a trained BPE's files, stored whole."""
    if name == "gpt2":
        return {"name": "gpt2"}
    files = [name, name + ".json"] if name.endswith(".bpe") else [name]
    return {"name": name, "files": {f: open(os.path.join(directory, f), encoding="utf-8").read() for f in files}}

# -----------------------------------------------------------------------------


def main():
    settings = configure_run()
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    torch.manual_seed(seed)
    if dev.type == "cpu":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # --- data ---
    directory = os.path.join(data_dir, dataset)
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        command = f"python prepare.py --dataset={dataset}" + (f" --tokenizer={tokenizer}" if tokenizer else "")
        raise SystemExit(f"error: {meta_path} not found: prepare the data first with\n    {command}")
    with open(meta_path) as f:
        meta = json.load(f)
    tokens_per_micro = micro_batch * block_size * world
    if total_batch_size % tokens_per_micro:
        raise SystemExit(f"error: total_batch_size={total_batch_size} must be a multiple of micro_batch * block_size "
                         f"* processes = {micro_batch} * {block_size} * {world} = {tokens_per_micro}")
    accum = total_batch_size // tokens_per_micro

    # --- model and optimizer ---
    ckpt = None
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(path):
            raise SystemExit(f"error: init_from=resume, but {path} does not exist")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    elif init_from == "scratch":
        model = GPT(model_config(meta["vocab_size"]))
    else:  # fine-tuning pretrained weights: the data must use the model's tokenizer
        model = GPT.from_pretrained(init_from, attn=attn)
        if meta["vocab_size"] > model.cfg.vocab_size or block_size > model.cfg.block_size:
            raise SystemExit(f"error: {init_from} has {model.cfg.vocab_size} tokens and block_size "
                             f"{model.cfg.block_size}; the data has {meta['vocab_size']} tokens and block_size is "
                             f"{block_size}: prepare the data with the model's tokenizer")
    if block_size > model.cfg.block_size:
        raise SystemExit(f"error: block_size={block_size}, but the model was built for {model.cfg.block_size}")
    model.to(dev)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg}")
    # weight decay on matrices only: not on norms and biases, nor (by default) the embeddings
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and (decay_embeddings or name not in ("wte.weight", "wpe.weight")) else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(beta1, beta2), fused=dev.type == "cuda")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype or (
        "fp32" if dev.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")]
    autocast = torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)  # fp16 needs loss scaling
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    raw_model = model
    if dev.type == "cuda" if compile is None else compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local] if dev.type == "cuda" else None)
    train_data = Shards(directory, "train", micro_batch, block_size, rank, world, True, ckpt["data"] if ckpt else None)
    spec = tokenizer_spec(directory, meta["tokenizer"])
    enc = bpe.load_tokenizer(meta["tokenizer"], directory)
    eot = meta["eot_id"]
    # bits per byte: each target token stands for its bytes of text (the end-of-text marker for none)
    token_bytes = torch.tensor([0 if i == eot else len(enc.decode_single_token_bytes(i))
                                for i in range(meta["vocab_size"])], dtype=torch.float64)
    eval_micro = max(1, eval_tokens // (micro_batch * block_size * world))

    def evaluate():
        """Mean val loss and bits per byte over a fixed slice: the first eval_micro micro-batches."""
        model.eval()
        data, total = Shards(directory, "val", micro_batch, block_size, rank, world, False), torch.zeros(3, device=dev)
        with torch.no_grad():
            for _ in range(eval_micro):
                x, y = data.next()
                x, y = x.to(dev), y.to(dev)
                with autocast:
                    _, loss = model(x, y, doc_starts=(x == eot) if doc_mask else None)
                total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=dev),
                                      token_bytes[y.cpu()].sum().to(dev)]).float()
        if ddp:
            dist.all_reduce(total)
        model.train()
        nats, count, n_bytes = total.tolist()
        return nats / count, nats / math.log(2) / max(n_bytes, 1)

    # what gzip -9 does on the same val text, as the bar to beat
    val = Shards(directory, "val", micro_batch, block_size, 0, 1, False)
    text = enc.decode_bytes([t for _ in range(eval_micro * world) for t in val.next()[1].flatten().tolist() if t != eot])
    gzip_bpb = len(gzip.compress(text, 9)) * 8 / max(len(text), 1)

    # --- signals: a checkpoint, then exit ---
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, "log.jsonl"), "a") if master else None
    peak = peak_flops(dev)
    flops_per_step = raw_model.flops_per_token(block_size) * total_batch_size
    log(f"{accum} micro-steps of {micro_batch} x {block_size} tokens per step on {world} process(es), {dev}, "
        f"{amp or torch.float32}; settings: {settings}")
    bad_steps, t0, logged = 0, time.time(), step
    while True:
        if step % eval_interval == 0 or step == max_steps:
            val_loss, val_bpb = evaluate()
            log(f"step {step}: val loss {val_loss:.4f}, val bits per byte {val_bpb:.4f} (gzip -9: {gzip_bpb:.4f})")
            if master:
                log_file.write(json.dumps({"step": step, "val_loss": val_loss, "val_bpb": val_bpb}) + "\n")
                log_file.flush()
            t0 = time.time()  # evaluation time is not training time
            logged = step
        if step == max_steps or stop["signal"]:
            break
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        for micro in range(accum):
            x, y = train_data.next()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            # gradients are averaged across processes only after the last micro-step
            sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync, autocast:
                _, loss = model(x, y, doc_starts=(x == eot) if doc_mask else None)
                loss = loss / accum  # so the step's gradient is the mean over all its micro-batches
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        if torch.isfinite(grad_norm) or scaler.is_enabled():  # with fp16, the scaler skips such steps itself
            scaler.step(optimizer)
            bad_steps = 0
        else:
            bad_steps += 1
            log(f"step {step}: the gradient is not finite (loss {loss_sum.item()}); update skipped")
            if bad_steps >= max_bad_steps:
                raise SystemExit(f"error: {bad_steps} steps in a row had non-finite gradients; lower learning_rate, "
                                 "or resume from the last checkpoint")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % log_interval == 0 or step == max_steps or (stop["signal"] and not ddp):
            if ddp:  # the mean loss over processes; and every process stops at the same step
                flags = torch.tensor([loss_sum.item(), float(stop["signal"] or 0)], device=dev)
                dist.all_reduce(flags)
                loss_sum, stop["signal"] = flags[0] / world, int(flags[1]) or None
            dt = (time.time() - t0) / (step - logged)
            t0, logged = time.time(), step
            tps = total_batch_size / dt
            mfu = flops_per_step / dt / peak / world if peak else None
            log(f"step {step}/{max_steps} | loss {float(loss_sum):.4f} | lr {lr:.2e} | norm {float(grad_norm):.3f} | "
                f"{tps:,.0f} tok/s | {dt * 1e3:.0f} ms | mfu {f'{mfu:.1%}' if mfu else 'n/a'}")
            if master:
                log_file.write(json.dumps({"step": step, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm),
                                           "tokens_per_s": tps, "step_ms": dt * 1e3, "mfu": mfu}) + "\n")
                log_file.flush()
        if master and (step == max_steps or stop["signal"] or (ckpt_interval and step % ckpt_interval == 0)):
            save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, train_data, settings, spec)
    if stop["signal"]:
        log(f"stopped by signal {stop['signal']} at step {step}; the checkpoint is {ckpt_path}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def configure_run():
    # a config file may also hold prepare.py's settings (num_shards, ...): they are skipped here
    settings = prepare.configure(globals(), others=prepare.setting_names(vars(prepare)))
    for key, choices in [("schedule", ("cosine", "wsd")), ("dtype", ("", "bf16", "fp16", "fp32"))]:
        if globals()[key] not in choices:
            raise SystemExit(f"error: {key}={globals()[key]!r}: choose one of {choices}")
    return settings


if __name__ == "__main__":
    try:
        main()
    except (ValueError, prepare.DownloadError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
