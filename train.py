"""
train.py: trains a GPT on prepare.py's shards with AdamW or Muon, on a CPU, one GPU, or many (DDP or FSDP).

    python train.py                                   # the quickstart: a small model on data/stdlib
    python train.py config/tinystories.py --max_steps=2000
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_small.py
    torchrun --standalone --nproc_per_node=8 train.py config/smollm2_1.7b.py   # sharded: parallel="fsdp"
    python train.py --init_from=resume --out_dir=out/tinystories    # continue its ckpt.pt exactly

Each step sees total_batch_size tokens: micro-batches of micro_batch sequences of
block_size tokens on every process, accumulated until the step is full. Logs go to
stdout and out_dir/log.jsonl; checkpoints to out_dir/ckpt.pt at every evaluation, at the
end, and on Ctrl-C or SIGTERM (then the exit code is 128 + the signal: 130 or 143); under
FSDP, ckpt.pt names a directory of shards beside it, one file per process.
The story is main(): the settings, then setup() (processes, data, model, optimizer),
then loop(). Checkpoints are checkpoint.py's format.
Read next: sample.py
"""
import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import checkpoint
import model
import prepare
from config import atomic_write, check, configure, setting_names
from evals import KNOWN, evaluate as evaluate_tasks, known, load_set, log_row, set_names
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (config/__init__.py)
# data
dataset = "stdlib"
tokenizer = ""  # what prepare.py used (a config file names it for both scripts); "" = the dataset's default
data_dir = "data"
out_dir = "out/quickstart"
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), a checkpoint file to fine-tune, or a pretrained name or directory
overwrite = False  # start from scratch in an out_dir that holds a checkpoint, deleting it
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
attn = "auto"  # how attention runs: "flash" (flash.py), "sdpa" (torch), "auto": flash on CUDA
doc_mask = False  # attend only within documents (end-of-text tokens start them); always on for conversations
chat_long = "truncate"  # a conversation longer than block_size + 1: "truncate" it, or "drop" it
qk_norm = False  # from the NanoGPT speedrun, each tried on the quickstart (docs/quickstart_trials.md): RMS-normalized queries and keys
logit_softcap = 0.0  # output logits soft-capped at this (cap * tanh(logits / cap)); 0: off
zero_init_proj = False  # the residual projections start at zero
value_embeds = True  # every layer adds a learned embedding of the tokens to its attention values
skips = False  # U-net skips: the second half of the blocks also adds the first half's outputs
# LoRA fine-tuning (model.LoRALinear): the model stays frozen, low-rank adapters train
lora_rank = 0  # 0: off (every weight trains)
lora_alpha = 16.0  # the update is scaled by alpha / rank (rslora: alpha / sqrt(rank))
lora_dropout = 0.0
lora_targets = "attn,mlp"  # which linear layers of every block: qkv, attn_proj, fc, mlp_proj; attn, mlp
lora_variant = "lora"  # "lora", "rslora" or "dora"
# memory (how the model runs, set on it as attn is; measured in `python bench.py memory`)
loss_chunk = 1024  # tokens at a time through the output head and loss, which then never hold all the logits; 0: all
activation_checkpointing = False  # recompute each block in the backward: a third more compute, far less memory
# batch: total_batch_size tokens a step = micro_batch * block_size * processes * accumulation
total_batch_size = 4096
micro_batch = 8
# optimizer: AdamW, or Muon for the blocks' matrices; warmup, then cosine or WSD (warmup-stable-decay) down to min_lr
optimizer = ""  # "muon" (the blocks' matrices; AdamW for the rest) or "adamw"; "": muon, but adamw for LoRA, FSDP, fine-tuning
muon_lr = 0.02  # Muon's peak learning rate; the schedule scales it as it scales learning_rate
muon_momentum = 0.95
muon_momentum_warmup = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum (the speedrun's); 0: off
muon_split = False  # Muon orthogonalizes q, k and v (and SwiGLU's gate and up) apart, not the fused matrix whole
learning_rate = 0.0  # AdamW's peak (under Muon: the embeddings, head, norms, biases); 0: 2e-2 with Muon, else 5e-3
min_lr = 0.0
warmup_steps = 20
max_steps = 720
schedule = "wsd"  # or "cosine"
decay_frac = 0.6  # WSD: the last fraction of the steps decays linearly
weight_decay = 0.1  # AdamW's, on matrices only; none on Muon's: with a tied head it then decays no weight
decay_embeddings = False
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# running
parallel = "ddp"  # under torchrun: "ddp" (a whole copy of the model on every process) or "fsdp" (sharded: FSDP2)
device = ""  # "" picks cuda, then mps, then cpu
dtype = ""  # "" picks bf16 on CUDA (fp16 where bf16 is missing), fp32 elsewhere
compile = None  # None: on CUDA only
eval_interval = 400
eval_tokens = 170000  # the fixed val tokens each evaluation reads (about all of stdlib's), whatever the process count
evals = ""  # downstream evaluation sets (evals.py) run at evaluations too, comma-separated: hellaswag, core, a chat dataset
evals_interval = 0  # steps between those runs (a multiple of eval_interval); 0: at every evaluation
eval_items = 0  # items per task (a fixed sample); 0: all
log_interval = 10
ckpt_interval = 0  # steps between checkpoints; 0: at every evaluation
ckpt_minutes = 5.0  # also a checkpoint once this many minutes passed since the last (at a log line); 0: off
seed = 1337
max_bad_steps = 5  # non-finite losses in a row before training stops
wandb_log = False  # also log every log.jsonl row to Weights & Biases (pip install wandb), with the settings
wandb_project = "llm-from-scratch"
wandb_run_name = ""  # "": out_dir's last part

# model settings that change how the model runs, not what it computes: attributes of the
# model, set from the settings on every run (resumed or fine-tuned too)
RUN_OPTIONS = ("attn", "loss_chunk", "activation_checkpointing")
# settings that may differ from the checkpoint's when resuming; every other one must match it
CHANGE_ON_RESUME = {"init_from", "out_dir", "data_dir", "overwrite", "max_steps", "learning_rate", "min_lr",
                    "warmup_steps", "schedule", "decay_frac", "weight_decay", "beta1", "beta2", "grad_clip",
                    "muon_lr", "muon_momentum", "muon_momentum_warmup",
                    "total_batch_size", "micro_batch", "device", "dtype", "compile", "eval_interval",
                    "eval_tokens", "evals", "evals_interval", "eval_items", "log_interval", "ckpt_interval", "ckpt_minutes",
                    "max_bad_steps", "parallel", "wandb_log", "wandb_project", "wandb_run_name",
                    *RUN_OPTIONS}


def check_settings(world):
    """Every setting's range, before anything starts; one line names the first bad one."""
    check([("micro_batch", micro_batch, micro_batch >= 1, "1 or more"),
           ("block_size", block_size, block_size >= 1, "1 or more"),
           ("total_batch_size", total_batch_size, total_batch_size >= 1 and
            total_batch_size % max(1, micro_batch * block_size * world) == 0,
            f"a positive multiple of micro_batch * block_size * processes = {micro_batch} * {block_size} * {world}"),
           ("max_steps", max_steps, max_steps >= 1, "1 or more"),
           ("loss_chunk", loss_chunk, loss_chunk >= 0, "0 (all tokens at once) or more tokens per chunk"),
           ("attn", attn, attn in ("auto", "flash", "sdpa"), "auto, flash or sdpa"),
           ("warmup_steps", warmup_steps, warmup_steps >= 0, "0 or more"),
           ("learning_rate", learning_rate, 0 < learning_rate < math.inf, "a positive number (0: see default_optimizer)"),
           ("min_lr", min_lr, 0 <= min_lr <= learning_rate, f"0 to learning_rate ({learning_rate})"),
           ("schedule", schedule, schedule in ("cosine", "wsd"), "cosine or wsd"),
           ("decay_frac", decay_frac, 0 <= decay_frac <= 1, "0 to 1"),
           ("weight_decay", weight_decay, weight_decay >= 0, "0 or more"),
           ("beta1", beta1, 0 <= beta1 < 1, "0 to 1 (not 1)"), ("beta2", beta2, 0 <= beta2 < 1, "0 to 1 (not 1)"),
           ("grad_clip", grad_clip, grad_clip > 0, "a positive number"),
           ("optimizer", optimizer, optimizer in ("", "adamw", "muon"), "adamw or muon (or '': see default_optimizer)"),
           ("optimizer", optimizer, optimizer != "muon" or (lora_rank == 0 and parallel == "ddp"),
            "adamw with LoRA or parallel=fsdp: Muon orthogonalizes each matrix's whole update, and LoRA's "
            "adapters are low-rank by design, FSDP's matrices split across processes"),
           ("muon_lr", muon_lr, 0 < muon_lr < math.inf, "a positive number"),
           ("muon_momentum", muon_momentum, 0 <= muon_momentum < 1, "0 to 1 (not 1)"),
           ("muon_momentum_warmup", muon_momentum_warmup, muon_momentum_warmup >= 0, "0 (off) or more steps"),
           ("dtype", dtype, dtype in ("", *model.DTYPES), f"one of {('', *model.DTYPES)}"),
           ("parallel", parallel, parallel in ("ddp", "fsdp"), "ddp or fsdp"),
           ("eval_interval", eval_interval, eval_interval >= 1, "1 or more"),
           ("chat_long", chat_long, chat_long in ("truncate", "drop"), "truncate or drop"),
           ("eval_tokens", eval_tokens, eval_tokens >= block_size, f"block_size ({block_size}) or more"),
           ("evals", evals, all(known(e, data_dir) for e in set_names(evals)), f"a comma-separated list of {KNOWN}; or ''"),
           ("evals_interval", evals_interval, evals_interval >= 0 and evals_interval % max(1, eval_interval) == 0,
            f"0 (at every evaluation) or a multiple of eval_interval ({eval_interval})"),
           ("eval_items", eval_items, eval_items >= 0, "0 (all) or more"),
           ("log_interval", log_interval, log_interval >= 1, "1 or more"),
           ("ckpt_interval", ckpt_interval, ckpt_interval >= 0, "0 (at every evaluation) or more"),
           ("ckpt_minutes", ckpt_minutes, 0 <= ckpt_minutes < math.inf, "0 (off) or more"),
           ("max_bad_steps", max_bad_steps, max_bad_steps >= 1, "1 or more"),
           ("lora_rank", lora_rank, lora_rank >= 0, "0 (off) or more"),
           ("lora_rank", lora_rank, lora_rank == 0 or init_from != "scratch",
            "0 with init_from=scratch: LoRA adapts a trained model (give init_from a checkpoint or pretrained model)"),
           ("lora_alpha", lora_alpha, lora_alpha > 0, "a positive number"),
           ("lora_dropout", lora_dropout, 0 <= lora_dropout < 1, "0 to 1 (not 1)"),
           ("lora_variant", lora_variant, lora_variant in model.LORA_VARIANTS, ", ".join(model.LORA_VARIANTS))])
    model.lora_layers(lora_targets)  # what they name, or an error saying what they may name
    if init_from != "scratch":
        checkpoint.locate(init_from, out_dir)  # a model there, or an error saying what init_from may name

# -----------------------------------------------------------------------------
# Data: shards streamed in a shuffled order, each process reading its own part of every step


class Shards:
    """Micro-batches x, y (B, T) from a split's shards. A shard is cut into sequences of
    T + 1 tokens (overlapping by one: y is x shifted) and, when shuffle, read in a fixed
    random order (seeded by seed, shard and pass), so that a step mixes text from all over
    the shard rather than one file of a sorted corpus; nothing is drawn twice in a pass.
    A conversation dataset's shards (chat_eot, its end-of-text id) are packed instead:
    whole conversations into rows of T + 1 tokens (pack), and y is -1 where a token is not
    a target. Every micro-step takes the next B * world sequences; process `rank` gets its
    B of them. A step's `per_step` sequences all come from one shard: the next shard starts
    when the rest of this one cannot hold a whole step, so where a shard ends does not
    depend on how steps are split into processes and micro-batches, and a run resumes
    exactly on another number of processes. The position (shard, sequence, pass) goes into
    checkpoints; after the last shard the next pass starts."""

    def __init__(self, directory, split, B, T, rank, world, seed, per_step, shuffle=True, state=None, chat_eot=None):
        self.files = prepare.shard_paths(directory, split)
        if not self.files:
            raise SystemExit(f"error: no {split}_*.bin shards in {directory}; run prepare.py first")
        self.B, self.T, self.rank, self.world, self.seed, self.shuffle = B, T, rank, world, seed, shuffle
        self.per_step, self.chat_eot = per_step, chat_eot
        self.shard, self.pos, self.epoch = (state["shard"], state["pos"], state["epoch"]) if state else (0, 0, 0)
        saved = state.get("shards", len(self.files)) if state else len(self.files)  # (older checkpoints lack it)
        if self.shard >= len(self.files) or saved != len(self.files):
            raise SystemExit(f"error: the checkpoint's data position (shard {self.shard} of {saved}) does not fit "
                             f"{directory}, which has {len(self.files)} {split} shards: the data changed since (prepared "
                             "again?). Resume on the data it was trained on, or start over with --overwrite")
        self._load()
        if state and state.get("tokens", len(self.tokens)) != len(self.tokens):
            raise SystemExit(f"error: {self.files[self.shard]} holds {len(self.tokens)} tokens, but {state['tokens']} "
                             "when the checkpoint was saved: the data changed since (prepared again?)")
        self.realigned = self.pos % per_step  # a resume with another total_batch_size: on to the next step
        self.pos += -self.pos % per_step

    def _load(self):
        self.tokens = prepare.read_shard(self.files[self.shard])
        rng = np.random.default_rng([self.seed, self.shard, self.epoch])
        if self.chat_eot is not None:  # (rows, T + 1) of tokens, and of targets or -1
            self.rows, self.packing = pack(self.tokens, prepare.read_targets(self.files[self.shard]), self.chat_eot,
                                           self.T + 1, rng if self.shuffle else None)
        n = len(self.rows[0]) if self.chat_eot is not None else (len(self.tokens) - 1) // self.T
        if n < self.per_step:
            raise SystemExit(f"error: {self.files[self.shard]} holds {n} sequences of {self.T} + 1 tokens, fewer than "
                             f"one step needs ({self.per_step}); lower total_batch_size or block_size")
        self.order = rng.permutation(n) if self.shuffle else np.arange(n)

    def rows_at(self, indices):
        """(len(indices), 2, T + 1): each sequence's tokens, and its targets (the tokens, or -1)."""
        if self.chat_eot is not None:
            return np.stack([self.rows[0][indices], self.rows[1][indices]], axis=1)
        tokens = np.stack([self.tokens[i * self.T:(i + 1) * self.T + 1] for i in indices]).astype(np.int64)
        return np.stack([tokens, tokens], axis=1)

    def next(self):
        # the next shard when the rest of this one cannot hold this micro-step or, as a step begins, the step
        need = self.per_step if self.pos % self.per_step == 0 else self.B * self.world
        if self.pos + need > len(self.order):
            self.shard, self.pos = (self.shard + 1) % len(self.files), 0
            self.epoch += self.shard == 0
            self._load()
        buf = torch.from_numpy(self.rows_at(self.order[self.pos + self.rank * self.B:self.pos + (self.rank + 1) * self.B]))
        self.pos += self.B * self.world
        return buf[:, 0, :-1], buf[:, 1, 1:]

    def state(self):
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch, "shards": len(self.files),
                "tokens": len(self.tokens)}


def pack(tokens, targets, eot, size, rng=None):
    """Whole conversations (each starts at its end-of-text token) into rows of `size` tokens,
    best fit: each goes into the row it leaves least room in, or a new row, so none is cut
    across rows (as nanochat's loader, and SmolLM2's fine-tuners, pack). One longer than a
    row is cut (chat_long="truncate") or left out ("drop"). Rows are padded with end-of-text
    tokens, which are no targets. rng: shuffle the conversations first. Returns (tokens,
    targets or -1), each (rows, size), and the counts: conversations, cut or dropped, and
    the packing efficiency (real tokens over the rows' room)."""
    import bisect
    starts = np.flatnonzero(tokens == eot).tolist() + [len(tokens)]
    convs = [(a, b) for a, b in zip(starts, starts[1:])]
    convs = [convs[i] for i in rng.permutation(len(convs))] if rng is not None else convs
    long = [c for c in convs if c[1] - c[0] > size]
    if chat_long == "drop":
        convs = [c for c in convs if c[1] - c[0] <= size]
    bins, free = [], []  # free: sorted (room left, row), to find the best fit by bisection
    for a, b in convs:
        need = min(b - a, size)
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            bins.append([])
            row, room = len(bins) - 1, size
        else:
            room, row = free.pop(k)
        bins[row].append((a, a + need))
        if room - need:
            bisect.insort(free, (room - need, row))
    out = np.full((2, len(bins), size), eot, dtype=np.int64)
    out[1] = -1
    for row, parts in enumerate(bins):
        at = 0
        for a, b in parts:
            out[0, row, at:at + b - a] = tokens[a:b]
            out[1, row, at:at + b - a] = np.where(targets[a:b] > 0, tokens[a:b].astype(np.int64), -1)
            at += b - a
    real = sum(b - a for parts in bins for a, b in parts)
    return out, {"conversations": len(convs), "long": len(long), "efficiency": real / max(1, len(bins) * size)}


def val_sequences(directory, T, n, chat_eot=None):
    """The val set every evaluation reads: the first n sequences of T + 1 tokens of the val
    shards, in order (all of them, if there are fewer), as (n, 2, T + 1): the tokens, and
    the targets (the tokens, or -1 where a conversation's token is no target: packed rows,
    as for training). The same whatever the process count."""
    out = []
    for path in prepare.shard_paths(directory, "val"):
        tokens = prepare.read_shard(path)
        if chat_eot is not None:
            rows = pack(tokens, prepare.read_targets(path), chat_eot, T + 1)[0]
            out += list(np.stack([rows[0], rows[1]], axis=1))[:n - len(out)]
        else:
            out += [np.stack([tokens[i * T:(i + 1) * T + 1]] * 2) for i in range((len(tokens) - 1) // T)][:n - len(out)]
    if not out:
        raise SystemExit(f"error: the val shards in {directory} hold fewer than block_size + 1 = {T + 1} tokens")
    return np.stack(out).astype(np.int64)  # (n, 2, T + 1)


# -----------------------------------------------------------------------------
# Learning rate, MFU, and a CPU speed trick


def lr_at(step):
    """Linear warmup to learning_rate, then cosine, or constant then a linear decay
    over the last decay_frac of the steps (WSD), down to min_lr at max_steps."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "wsd":  # the decay starts after warmup, however long decay_frac asks it to be
        decay_start = max(warmup_steps, max_steps * (1 - decay_frac))
        frac = max(0.0, (step - decay_start) / max(1.0, max_steps - decay_start))
        return learning_rate - (learning_rate - min_lr) * min(frac, 1.0)
    frac = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * frac))


def momentum_at(step):
    """Muon's momentum: from 0.85 up to muon_momentum over the first muon_momentum_warmup steps."""
    frac = min(1.0, step / muon_momentum_warmup) if muon_momentum_warmup else 1.0
    return 0.85 + (muon_momentum - 0.85) * frac


# dense bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("4090", 165e12), ("V100", 125e12)]


def peak_flops(dev):
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def glibc():
    """The C library, to tune its memory allocator; None where it is not glibc (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory():
    """Speed trick for training on a CPU under Linux: glibc gives big freed blocks (the
    logits and their gradients, tens of MB) back to the OS, and the next step's tensors
    page-fault them in again, which cost the quickstart about a fifth of each step. This
    keeps them in the heap for reuse instead, as jemalloc or tcmalloc would."""
    if libc := glibc():
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap
        libc.mallopt(-3, 2 ** 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GB from the heap


def return_freed_memory():
    """The opposite, for FSDP on a CPU, which is there to save memory: it gathers a block's
    weights and frees them again, block after block, and glibc, which raises its threshold
    for giving freed blocks back to the OS each time it sees a big one freed, ends up
    keeping them all in a fragmented heap. A 170M-weight model peaked at 4.9 GB a process
    on 2 processes, more than under DDP (4.4); with this fixed threshold, at 2.3 GB."""
    if libc := glibc():
        libc.mallopt(-3, 2 ** 20)  # M_MMAP_THRESHOLD: blocks of 1 MB or more go back to the OS when freed

# -----------------------------------------------------------------------------
# The model and its optimizer


def model_config(vocab_size):
    """The GPTConfig of the settings above: the model settings are GPTConfig's fields."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    return GPTConfig(vocab_size=vocab_size, **{k: v for k, v in setting_names(globals()).items() if k in fields})


def default_optimizer():
    """What optimizer="" and learning_rate=0 stand for, as {setting: value} for main() to
    set. optimizer="": Muon when training from scratch (it was measured there),
    AdamW where Muon cannot go (LoRA's low-rank adapters, FSDP's split matrices) and for
    fine-tuning, whose recipes were tuned with AdamW. learning_rate=0: each one's best on
    the quickstart (docs/quickstart_trials.md): under Muon, AdamW trains only the
    embeddings, the head, norms and biases, and they gained from 4x the rate that AdamW
    was tuned to for the whole model. The choices go into checkpoints."""
    chosen = optimizer or ("muon" if init_from == "scratch" and lora_rank == 0 and parallel == "ddp" else "adamw")
    return {"optimizer": chosen, "learning_rate": learning_rate or (2e-2 if chosen == "muon" else 5e-3)}


def build_model(meta, ckpt, source, dev):
    """The model, and its LoRA record for checkpoints (None without LoRA): the run's
    checkpoint's, a new one from scratch, or `source`, a model to fine-tune, maybe frozen
    under LoRA adapters. How it runs (attn, loss_chunk, ...) comes from the settings."""
    lora = ckpt.get("lora") if ckpt else None
    if ckpt is not None:  # a sharded checkpoint's weights are read once the model is sharded too (restore)
        m = checkpoint.model_from_checkpoint(ckpt, weights="shards" not in ckpt)
    elif source is None:
        m = GPT(model_config(meta["vocab_size"]))
    elif lora_rank:
        lora = checkpoint.lora_record(init_from, source, lora_rank, lora_alpha, lora_dropout, lora_targets,
                                      lora_variant, meta["vocab_size"])
        m = checkpoint.with_adapters(source, lora)  # (grown, where the data has new tokens)
    else:
        m = model.grow_vocab(source, max(meta["vocab_size"], source.cfg.vocab_size))  # a chat's new tokens
    m.attn, m.loss_chunk, m.activation_checkpointing = attn, loss_chunk, activation_checkpointing  # RUN_OPTIONS
    if meta["vocab_size"] > m.cfg.vocab_size:
        raise SystemExit(f"error: the data has {meta['vocab_size']} tokens, the model {m.cfg.vocab_size}: "
                         "prepare the data with the model's tokenizer")
    if block_size > m.cfg.block_size:
        raise SystemExit(f"error: block_size={block_size}, but the model was built for {m.cfg.block_size}")
    return m.to(dev), lora


def make_optimizer(m, dev):
    """AdamW, with weight decay on matrices only: not on norms and biases, nor (by default)
    the embeddings. Under FSDP m's weights are shards (DTensors), and so is AdamW's state.
    With optimizer="muon", the blocks' matrices go to Muon instead (check_settings refuses
    it with LoRA and FSDP)."""
    decay, no_decay, hidden = [], [], []
    for name, p in m.named_parameters():
        if not p.requires_grad:  # under LoRA, all but the adapters
            continue
        if optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            hidden.append((name, p))
        elif p.dim() >= 2 and (decay_embeddings or not name.startswith(("wte.", "wpe.", "value_embeds."))):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay}, {"params": no_decay}]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=learning_rate, fused=dev.type == "cuda")
    else:
        opt = Muon(groups + muon_groups(hidden, m.cfg), lr=learning_rate, betas=(beta1, beta2), momentum=muon_momentum)
    return set_hyperparameters(opt)


def muon_groups(hidden, cfg):
    """Muon's groups of (name, matrix): one, or with muon_split three, the fused matrices
    apart, each with the rows of its parts (`split`): q, k and v in qkv, gate and up in
    SwiGLU's fc. Whole, a part with a small gradient (k's) gets a small share of the update."""
    if not muon_split:
        return [{"params": [p for _, p in hidden], "muon": True}]
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    splits = {"attn.qkv.weight": (H * D, Hkv * D, Hkv * D), "mlp.fc.weight": (cfg.mlp_hidden,) * 2}
    if cfg.mlp != "swiglu":
        splits.pop("mlp.fc.weight")
    return [{"params": [p for n, p in hidden if n.endswith(key)], "muon": True, "split": rows}
            for key, rows in splits.items()] + \
        [{"params": [p for n, p in hidden if not n.endswith(tuple(splits))], "muon": True}]


def set_hyperparameters(opt):
    """The settings' weight decay, betas and momentum on the groups make_optimizer made (in
    its order: decay, no decay, Muon's): when made, and again after a resume has restored
    the checkpoint's, which may be changed on resume (the learning rate is set every step)."""
    for i, group in enumerate(opt.param_groups):
        group.update(weight_decay=weight_decay if i == 0 else 0.0, betas=(beta1, beta2))
        if "momentum" in group:  # Muon's (the momentum of its matrices)
            group["momentum"] = muon_momentum
    return opt


def orthogonalize(g, steps=5):
    """The matrix nearest to g with all singular values 1 (U V^T of g = U S V^T), roughly:
    a Newton-Schulz iteration x <- a x + b (x x^T) x + c (x x^T)^2 x applies the odd
    polynomial p(s) = a s + b s^3 + c s^5 to every singular value s. Muon's coefficients
    (Jordan et al. 2024) make p steep at 0, so 5 steps take any s in (0, 1] to about
    0.7-1.2: not exactly 1, but cheaply, and in bf16 on a GPU. g: (rows, cols), or a
    stack of such (n, rows, cols), each orthogonalized on its own."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # x x^T is then the smaller product
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # the Frobenius norm bounds the largest s: all s <= 1
    for _ in range(steps):
        xxt = x @ x.mT
        x = a * x + (b * xxt + c * xxt @ xxt) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalized by Newton-Schulz, Jordan et al. 2024) for the groups
    marked "muon", AdamW for the rest: one optimizer, so that the schedule, checkpoints
    and resume treat it as they treat AdamW. Muon takes each hidden matrix's momentum
    and replaces it by the nearest orthogonal matrix: every direction of the update moves
    as far, not just the few that dominate the gradient. Under DDP the gradients are
    averaged before step(), so every process computes the same update."""

    def __init__(self, groups, lr, betas, momentum):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, lr = [p for p in group["params"] if p.grad is not None], group["lr"]
            for p in params:  # decoupled weight decay, as AdamW's
                p.mul_(1 - lr * group["weight_decay"])
            if group["muon"]:
                self.muon_step(params, lr, group["momentum"], group.get("split"))
                continue
            for p in params:  # AdamW, as torch.optim.AdamW computes it
                state, g, (b1, b2) = self.state[p], p.grad, group["betas"]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** state["step"])).sqrt_().add_(1e-8)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** state["step"]))

    def muon_step(self, params, lr, mu, split=None):
        """Muon's update of matrices, or of parts of them (split: the rows of each): the
        matrices of one shape (the same weight in every block) are orthogonalized together,
        as one stack: a few large matmuls, not many small."""
        by_shape = {}  # shape -> [(matrix, its part, the part's rows)]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
            self.state[p]["momentum"].lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * g
            g = p.grad.lerp(self.state[p]["momentum"], mu)  # Nesterov: a step ahead, g + mu * (buf - g)
            start = 0
            for rows in split or (p.size(0),):
                by_shape.setdefault((rows, p.size(1)), []).append((p, g[start:start + rows], slice(start, start + rows)))
                start += rows
        for (rows, cols), same in by_shape.items():
            updates = orthogonalize(torch.stack([part for _, part, _ in same]))
            scale = max(1, rows / cols) ** 0.5  # tall matrices: the same RMS as wide ones
            for (p, _, where), update in zip(same, updates):
                p[where].add_(update, alpha=-lr * scale)


def mixed_precision(dev):
    """(dtype, autocast context, loss scaler): bf16 autocast on CUDA, fp16 with a scaler
    where bf16 is missing, plain fp32 elsewhere."""
    amp = model.pick_dtype(dev, dtype)
    autocast = torch.autocast(dev.type, dtype=amp) if amp != torch.float32 else contextlib.nullcontext()
    return amp, autocast, torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)


def parallelize(m, amp, dev, ddp):
    """(fast_model, train_model): m compiled (by default on CUDA), and under torchrun
    wrapped for data parallelism. DDP keeps a whole copy of the model, its gradients and
    AdamW's state on every process: 16 bytes a weight. FSDP (parallel="fsdp", FSDP2's
    fully_shard) shards all three across the processes, so each holds 1/world of them:
    every block, and then the rest of the model, gathers its weights just before it runs
    and frees them after, and reduce-scatters its gradients (averages them and keeps its own
    shard). m itself is sharded in place; compiled per block, so the gathers stay outside."""
    compiled = dev.type == "cuda" if compile is None else compile
    if not (ddp and parallel == "fsdp"):
        fast = torch.compile(m) if compiled else m
        return fast, DDP(fast, device_ids=[dev.index] if dev.type == "cuda" else None) if ddp else fast
    if amp == torch.float16:
        raise SystemExit("error: parallel=fsdp trains in bf16 or fp32, and this GPU has no bf16: use dtype=fp32 "
                         "or parallel=ddp (which runs fp16 with a loss scaler)")
    # bf16 copies of the weights are gathered and computed with; gradients are reduced in
    # fp32; the sharded weights and AdamW's state stay fp32. Off (fp32) on CPU
    policy = MixedPrecisionPolicy(param_dtype=None if amp == torch.float32 else amp, reduce_dtype=torch.float32)
    for block in m.blocks:
        if compiled:
            block.compile()  # in place: the weight names stay as they are
        fully_shard(block, mp_policy=policy)
    fully_shard(m, mp_policy=policy)  # the rest: embeddings, final norm, output head
    # FSDP warns that the model returns a view (its logits); nothing modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    return m, m


# -----------------------------------------------------------------------------
# Setting up a run: processes, data, model, optimizer


def setup_distributed():
    """(ddp, rank, world, device): one process, or one of torchrun's; seeded and tuned."""
    ddp = "RANK" in os.environ  # started by torchrun
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    dev = model.pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    if dev.type == "cpu" and ddp and parallel == "fsdp":
        return_freed_memory()
    elif dev.type == "cpu":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, dev


def prepare_out_dir(resuming, master):
    """out_dir, made, checked writable and held (hold_out_dir) by process 0; a from-scratch
    run does not overwrite a run there. Returns the hold, which ends when it is closed."""
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise SystemExit(f"error: out_dir={out_dir!r} cannot be written ({type(e).__name__}: {e.strerror}); "
                         "choose another --out_dir") from None
    hold = hold_out_dir() if master else contextlib.nullcontext()
    if not resuming and os.path.exists(ckpt_path):
        if not overwrite:
            raise SystemExit(f"error: {ckpt_path} exists: continue it with --init_from=resume, choose another "
                             "--out_dir, or pass --overwrite to delete it and start over")
        for f in (ckpt_path, ckpt_path.replace(".pt", ".prev.pt"), log_path) if master else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        if master:
            checkpoint.remove_stale_shards(ckpt_path)  # with no ckpt.pt left, every shard directory
    return hold


def hold_out_dir():
    """An exclusive lock on out_dir/train.lock, holding this process's PID: two runs in one
    out_dir would overwrite each other's checkpoints and interleave their logs. The kernel
    releases it when the file is closed or the process dies, kill -9 included."""
    lock = open(os.path.join(out_dir, "train.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise SystemExit(f"error: out_dir={out_dir!r} is in use by another train.py run (PID {pid}): wait for it "
                         "to end, or choose another --out_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def load_data(model_spec):
    """The data directory, its meta.json and tokenizer, and the tokenizer's files (for
    checkpoints), or what to run to prepare them. A run that continues a model (resumed,
    or fine-tuned) must use the model's tokenizer, model_spec, or one that adds special
    tokens to it (a chat's): the model then grows (build_model)."""
    directory = os.path.join(data_dir, prepare.dataset_name(dataset))
    if not os.path.exists(os.path.join(directory, "meta.json")):
        if dataset not in prepare.DATASETS and not os.path.exists(dataset):
            raise SystemExit(f"error: {prepare.unknown_dataset(dataset)} (no {directory}/meta.json)")
        command = f"python prepare.py --dataset={dataset}" + (f" --tokenizer={tokenizer}" if tokenizer else "")
        raise SystemExit(f"error: {directory}/meta.json not found: prepare the data first with\n    {command}")
    meta, enc = prepare.load_meta(directory)
    spec = checkpoint.tokenizer_spec(directory, meta["tokenizer"])
    if model_spec is not None and model_spec != spec and not bpe.extends(checkpoint.tokenizer(model_spec), enc):
        raise SystemExit(f"error: {directory} was tokenized with another tokenizer ({meta['tokenizer']}, "
                         f"{meta['vocab_size']} tokens) than the model of init_from={init_from} has "
                         f"({model_spec['name']}): prepare the data with the model's tokenizer, "
                         f"python prepare.py --dataset={dataset} --tokenizer=MODEL (its name, directory, or the "
                         "data directory it was trained on)")
    return directory, meta, enc, spec


@dataclasses.dataclass
class Run:
    """What setup() makes and loop() works with."""
    ddp: bool  # under torchrun
    rank: int
    world: int
    dev: torch.device
    log: object  # print on process 0, nothing on the others
    raw_model: GPT  # the model itself: its weights go into checkpoints
    fast_model: torch.nn.Module  # compiled (on CUDA): evaluation runs it
    train_model: torch.nn.Module  # compiled and wrapped in DDP, or sharded: training steps run it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    base: str  # what the run started from: None (scratch), or the model it fine-tunes
    lora: dict  # the LoRA record, or None
    spec: dict  # the tokenizer, for checkpoints
    eot: int
    doc_eot: int  # the end-of-text id where documents are kept apart (doc_mask, or conversations), else None
    train_data: Shards
    val: np.ndarray  # (n, 2, block_size + 1) val sequences: tokens, and targets (or -1)
    n_bytes: torch.Tensor  # bytes of text per token id, for bits per byte
    enc: object  # the tokenizer (a tiktoken.Encoding), for the downstream evals
    sets: dict  # the downstream evaluation sets, {name: evals.load_set(...)}
    accum: int  # micro-steps per step
    step: int  # the step it starts at
    saved: int  # the step of the last good checkpoint, or None
    saved_at: float  # when a checkpoint was last saved or tried (time.time())
    hold: object  # the lock on out_dir (process 0), released when closed
    tracker: object = None  # the wandb run (process 0, wandb_log), or None


def setup(ckpt):
    """Processes, data, model, optimizer, all restored from ckpt when resuming: the Run,
    or None when a resumed run has nothing left to train."""
    ddp, rank, world, dev = setup_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    source, model_spec = None, ckpt["tokenizer"] if ckpt else None
    if ckpt is None and init_from != "scratch":  # fine-tuning: the model first, as the data must share its tokenizer
        source, model_spec, _ = checkpoint.load_model(init_from)
    directory, meta, enc, spec = load_data(model_spec)
    if ckpt is not None and ckpt["step"] >= max_steps:
        log(f"{out_dir}/ckpt.pt is at step {ckpt['step']}, and max_steps={max_steps}: nothing to train. "
            "Raise max_steps to go on.")
        return None
    hold = prepare_out_dir(ckpt is not None, rank == 0)

    # the model, its precision and optimizer; compiled on CUDA, wrapped in DDP or sharded (FSDP) under torchrun
    raw_model, lora = build_model(meta, ckpt, source, dev)
    torch.manual_seed(seed + rank)  # the same init on every process, then each its own draws (LoRA's dropout)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({trainable / 1e6:.3f}M trained), {raw_model.cfg}, "
        f"attn={attn}, loss_chunk={loss_chunk}, activation_checkpointing={activation_checkpointing}")
    amp, autocast, scaler = mixed_precision(dev)
    log(f"compute: {amp} on {dev}" + (" (autocast)" if amp != torch.float32 else ""))
    fast_model, train_model = parallelize(raw_model, amp, dev, ddp)
    optimizer = make_optimizer(raw_model, dev)
    if ckpt is not None:
        checkpoint.restore(ckpt, raw_model, optimizer, scaler, lora, rank, dev)
        set_hyperparameters(optimizer)  # the settings' own, where a resume changed them
    if weight_decay and not optimizer.param_groups[0]["params"]:
        log(f"note: weight_decay={weight_decay} applies to no weight: Muon's matrices take none, and the embeddings "
            "only with decay_embeddings=True")

    # the data: training shards, the fixed val set, and each token's bytes for bits per byte
    chat_eot = meta["eot_id"] if meta.get("chat") else None  # conversations: packed, targets masked
    train_data = Shards(directory, "train", micro_batch, block_size, rank, world, seed,
                        total_batch_size // block_size, state=ckpt["data"] if ckpt else None, chat_eot=chat_eot)
    if train_data.realigned:
        log(f"data: total_batch_size changed on resume; {train_data.per_step - train_data.realigned} sequences "
            "skipped to start a whole step")
    if chat_eot is not None:
        p = train_data.packing
        log(f"data: conversations packed whole into rows of {block_size + 1} tokens, {p['efficiency']:.1%} full; "
            f"{p['long']} of {p['conversations'] + (p['long'] if chat_long == 'drop' else 0)} longer than a row "
            + ("cut" if chat_long == "truncate" else "dropped") + " (chat_long); attention kept within each")
    val = val_sequences(directory, block_size, eval_tokens // block_size, chat_eot)
    eot, names = meta["eot_id"], [e.strip() for e in evals.split(",") if e.strip()]
    if names and rank == 0:
        prepare.prepare_evals(names, data_dir)  # downloaded and converted once
    if names and ddp:
        dist.barrier()
    sets = {name: load_set(name, data_dir) for name in names}
    log(f"val: {int((val[:, 1, 1:] >= 0).sum()):,} tokens; gzip -9 on their text: {gzip_bpb(val, enc, eot):.4f} bits per byte")
    base = ckpt.get("base") if ckpt else None if init_from == "scratch" else checkpoint.base_name(init_from)
    return Run(ddp, rank, world, dev, log, raw_model, fast_model, train_model, optimizer, scaler, autocast, base,
               lora, spec, eot, eot if doc_mask or chat_eot is not None else None, train_data, val, torch.from_numpy(prepare.token_bytes(enc)).to(dev), enc, sets,
               total_batch_size // (micro_batch * block_size * world), *[ckpt["step"] if ckpt else 0] * 2,
               time.time(), hold, start_wandb() if wandb_log and rank == 0 else None)

# -----------------------------------------------------------------------------
# A training step, and evaluation


def start_wandb():
    """A Weights & Biases run with the settings as its config: wandb is imported only here,
    and a missing package or a failed start stops the run now, not at its first log line."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: wandb_log=True needs wandb: pip install wandb") from None
    try:
        return wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.normpath(out_dir)),
                          config=setting_names(globals()))
    except Exception as e:  # no login, no network, a bad project name ...
        raise SystemExit(f"error: wandb could not start ({type(e).__name__}: {str(e).strip()[:200]}); log in with "
                         "`wandb login`, or set WANDB_MODE=offline, or run with wandb_log=False") from None


def grad_sync(train_model, on):
    """Whether this micro-step's backward shares the gradients across processes: only the
    last of a step needs to; the others accumulate them locally, saving the traffic (DDP's
    all-reduce, FSDP's reduce-scatter). FSDP then holds a whole fp32 gradient until the
    last micro-step: 4 bytes a weight."""
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(on)
    elif isinstance(train_model, DDP) and not on:
        return train_model.no_sync()
    return contextlib.nullcontext()


def train_step(train_model, raw_model, optimizer, scaler, data, accum, autocast, dev, doc_eot):
    """One step: gradients accumulated over `accum` micro-batches, clipped, then one update,
    skipped when the gradient is not finite. doc_eot: the end-of-text id where documents
    are kept apart (doc_mask), else None. Returns the step's mean loss (a tensor, so that
    the GPU need not wait for it), the gradient norm, and whether it updated."""
    # the step's loss is the mean over all of its targets, on every process: a micro-batch's
    # mean loss weighs as its share of them (with conversations, some tokens are no targets)
    batches = [data.next() for _ in range(accum)]
    counts = [int((y >= 0).sum()) for _, y in batches]
    total = torch.tensor(float(sum(counts)), device=dev)
    if dist.is_initialized():
        dist.all_reduce(total)  # DDP and FSDP average the gradients over the processes: scaled by world below
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=dev)
    total = total.clamp(min=1)
    for micro, (x, y) in enumerate(batches):
        if not counts[micro]:  # no targets (conversations cut before a reply): one, weighed 0, keeps the loss finite
            y = y.clone()
            y[0, 0] = 0
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with grad_sync(train_model, micro == accum - 1), autocast:
            _, loss = train_model(x, y, doc_starts=(x == doc_eot) if doc_eot is not None else None)
            loss = loss * (counts[micro] * world / total)  # = its summed loss over the step's targets (x world)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    if isinstance(grad_norm, DTensor):  # FSDP: the shards' squares were summed across processes: the global norm
        grad_norm = grad_norm.full_tensor()
    ok = bool(torch.isfinite(grad_norm)) or scaler.is_enabled()  # with fp16, the scaler skips such steps itself
    if ok:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, ok


@torch.no_grad()
def evaluate(m, val, n_bytes, autocast, doc_eot, rank, world, ddp):
    """Mean val loss and bits per byte over the fixed val set, split across processes:
    process `rank` takes every world-th sequence. m must not be DDP-wrapped: DDP would
    sync on a forward that not all processes run. Under FSDP every forward gathers weights
    from all processes, so all run as many: one with fewer sequences runs an extra batch
    that it does not count."""
    m.eval()
    dev = n_bytes.device
    total = torch.zeros(3, dtype=torch.float64, device=dev)  # nats, target tokens, bytes
    mine = torch.from_numpy(val[rank::world])
    for i in range(0, len(val[0::world]), micro_batch):  # process 0 has the most
        batch = mine[i:i + micro_batch] if i < len(mine) else torch.from_numpy(val[:1])
        x, y = batch[:, 0, :-1].to(dev), batch[:, 1, 1:].to(dev)  # y: -1 where no target
        with autocast:
            _, loss = m(x, y, doc_starts=(x == doc_eot) if doc_eot is not None else None)
        if i < len(mine):  # not the extra batch, which only keeps the processes in step
            count = (y >= 0).sum()
            total += torch.stack([loss.double() * count, count.double(), (n_bytes[y.clamp(min=0)] * (y >= 0)).sum()])
    if ddp:
        dist.all_reduce(total)
    m.train()
    nats, count, nb = total.tolist()
    return nats / count, nats / math.log(2) / max(nb, 1)


def gzip_bpb(val, enc, eot):
    """What gzip -9 does on the same val text: the bar to beat, in bits per byte."""
    text = enc.decode_bytes([t for t in val[:, 0, 1:].flatten().tolist() if t != eot])
    return len(gzip.compress(text, 9)) * 8 / max(len(text), 1)

# -----------------------------------------------------------------------------
# The run: settings, setup, then the loop


def main():
    # settings: the config file and command line, then what a resume takes back from its
    # checkpoint, then the defaults that depend on other settings; then every one is checked
    given = configure(globals(), others=setting_names(vars(prepare)))  # a config file may hold prepare.py's too
    ckpt = checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if init_from == "resume" else None
    if ckpt is not None:
        globals().update(checkpoint.resume_settings(ckpt, given, CHANGE_ON_RESUME, setting_names(globals())))
    globals().update(default_optimizer())
    check_settings(int(os.environ.get("WORLD_SIZE", "1")))

    run = setup(ckpt)
    if run is None:
        return
    with run.hold, catch_signals(run.ddp) as stop, open_log(run) as log_file:
        step = loop(run, stop, log_file)
    finish(run, step, stop)


def loop(r, stop, log_file):
    """From the run's step to max_steps: evaluate once in a while, save checkpoints, train.
    Stops early, after saving, when stop["signal"] is set. Returns the last step."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    r.log(f"{r.accum} micro-steps of {micro_batch} x {block_size} tokens per step on {r.world} process(es), "
          f"{r.dev}; settings: {setting_names(globals())}")
    r.log(f"checkpoints: every {ckpt_interval or eval_interval} steps" +
          (f" and every {ckpt_minutes:g} minutes (at a log line)" if ckpt_minutes else "") + ", at the end and on a signal")
    step = start = r.step
    bad_steps, t0, logged, due = 0, time.time(), step, False
    while True:
        last_step = step >= max_steps
        # once in a while, and at the end: the val loss and bits per byte (a resumed run's checkpoint's run
        # evaluated its first step)
        if (step % eval_interval == 0 or last_step) and not stop["signal"] and (step > start or start == 0):
            r.log(f"step {step}: evaluating on {int((r.val[:, 1, 1:] >= 0).sum()):,} val tokens ...")
            val_loss, val_bpb = evaluate(r.fast_model, r.val, r.n_bytes, r.autocast, r.doc_eot, r.rank,
                                         r.world, r.ddp)
            r.log(f"step {step}: val loss {val_loss:.4f}, val bits per byte {val_bpb:.4f}")
            write_log(r, log_file, {"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
            if r.sets and (evals_interval == 0 or step % evals_interval == 0 or last_step):  # downstream tasks
                results = evaluate_tasks(r.fast_model, r.enc, r.sets, r.dev, r.autocast, eval_items, micro_batch,
                                         r.rank, r.world)
                r.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in log_row(results).items()))
                write_log(r, log_file, {"step": step, **log_row(results)})
            t0, logged = time.time(), step  # evaluation time is not training time
        # at every evaluation (or every ckpt_interval steps), every ckpt_minutes, at the end and on a signal:
        # a checkpoint
        if step > start and (step % (ckpt_interval or eval_interval) == 0 or last_step or stop["signal"] or due):
            save(r, step, ckpt_path, "" if not due else f" ({ckpt_minutes:g} minutes since the last)")
            due = False
        if last_step or stop["signal"]:
            return step

        # one training step
        lr = lr_at(step)
        for group in r.optimizer.param_groups:  # Muon's matrices on the same schedule, from muon_lr
            group["lr"] = lr * muon_lr / learning_rate if group.get("muon") else lr
            if group.get("muon"):
                group["momentum"] = momentum_at(step)
        loss, grad_norm, ok = train_step(r.train_model, r.raw_model, r.optimizer, r.scaler, r.train_data, r.accum,
                                         r.autocast, r.dev, r.doc_eot)
        bad_steps = 0 if ok else bad_steps + 1
        if not ok:
            r.log(f"step {step}: the gradient is not finite (loss {loss.item()}); update skipped")
        if bad_steps >= max_bad_steps:
            raise SystemExit(f"error: {bad_steps} steps in a row had non-finite gradients; lower learning_rate, "
                             f"or resume from the last checkpoint, {ckpt_path}")
        step += 1

        # once in a while: log; under DDP, the processes also agree here on stopping for a signal
        if step % log_interval == 0 or step == max_steps or (stop["signal"] and not r.ddp):
            due = 0 < ckpt_minutes * 60 <= time.time() - r.saved_at
            if r.ddp:
                loss, due = agree(loss, stop, r.world, r.dev, due)
            dt, t0, logged = (time.time() - t0) / (step - logged), time.time(), step
            log_step(r, log_file, step, float(loss), lr, float(grad_norm), dt)
            if float(loss) > checkpoint.worst_loss(r.raw_model.cfg):  # diverged: nothing after this is worth a save
                raise SystemExit(f"error: the loss diverged at step {step}: {float(loss):.4g}, worse than guessing "
                                 f"(ln {r.raw_model.cfg.vocab_size} + 1 = {checkpoint.worst_loss(r.raw_model.cfg):.2f})."
                                 f" {last_good(r)}; lower learning_rate (now {learning_rate}) and resume from it")


def save(r, step, path, why=""):
    """A checkpoint of the run at this step, by process 0 (under FSDP by all: each writes
    its shard), unless the model is not healthy (checkpoint.healthy): the loss these
    weights give on a val batch is the probe."""
    r.saved_at, saving = time.time(), r.rank == 0 or parallel == "fsdp"
    if saving:
        with torch.no_grad(), r.autocast:  # the loss these weights give, as a health check
            probe = torch.from_numpy(r.val[:micro_batch]).to(r.dev)
            probe_loss = float(r.fast_model(probe[:, 0, :-1], probe[:, 1, 1:])[1])
    states = [checkpoint.rng_state(r.dev)]  # after the probe, whose dropout (LoRA's) draws from them
    if r.ddp:  # every process's random state: each draws its own
        states = [None] * r.world
        dist.all_gather_object(states, checkpoint.rng_state(r.dev))
    if not saving:
        return
    try:
        saved = checkpoint.save(path, r.raw_model, r.optimizer, r.scaler, step, r.train_data.state(), states,
                                setting_names(globals()), r.spec, r.base, r.lora, probe_loss, parallel == "fsdp")
    except checkpoint.WriteError as e:
        raise SystemExit(f"error: step {step}: {e}. {last_good(r)}") from None
    if saved:
        r.saved = step
        r.log(f"step {step}: saved {path}{why}")
    else:
        r.log(f"step {step}: NOT saved: a weight is not finite, or the val loss is {probe_loss:.4g}, not finite "
              f"or worse than guessing (above {checkpoint.worst_loss(r.raw_model.cfg):.2f}). {last_good(r)}")


def last_good(r):
    """Where the last good checkpoint is, in words."""
    if r.saved:
        return f"The last good checkpoint is {os.path.join(out_dir, 'ckpt.pt')}, at step {r.saved}"
    return "No checkpoint of this run was saved"


def log_step(r, log_file, step, loss, lr, grad_norm, dt):
    """One line of progress, printed and in log.jsonl; dt: seconds a step, since the last."""
    peak = peak_flops(r.dev)
    mfu = r.raw_model.flops_per_token(block_size) * total_batch_size / dt / peak / r.world if peak else None
    r.log(f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
          f"{total_batch_size / dt:,.0f} tok/s | {dt * 1e3:.0f} ms | mfu {f'{mfu:.1%}' if mfu else 'n/a'}")
    write_log(r, log_file, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                         "tokens_per_s": total_batch_size / dt, "step_ms": dt * 1e3, "mfu": mfu})


@contextlib.contextmanager
def catch_signals(ddp):
    """Within it, Ctrl-C and SIGTERM set stop["signal"], and the loop finishes its step,
    saves and stops; under torchrun they set stop["received"] until the processes agree on
    it at a log line (saving may be collective). The handlers before are put back after."""
    stop = {"signal": None, "received": None}
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: stop.update({"received" if ddp else "signal": signum}))
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def open_log(r):
    """out_dir/log.jsonl on process 0, nothing elsewhere. A resumed run continues it from its
    checkpoint's step: rows after it were of work that the checkpoint does not hold (a run
    killed between two saves), and are dropped."""
    if r.rank != 0:
        return contextlib.nullcontext()
    path = os.path.join(out_dir, "log.jsonl")
    if r.step and os.path.exists(path):
        rows = checkpoint.read_log(path)
        with atomic_write(path) as f:
            f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= r.step)
    return open(path, "a" if r.step else "w", encoding="utf-8")


def finish(r, step, stop):
    """The end of a run: the processes part, the wandb run ends, and a signal's exit code
    (128 + the signal)."""
    if r.tracker is not None:
        r.tracker.finish(exit_code=128 + stop["signal"] if stop["signal"] else 0)
    if r.ddp:
        # DDP holds the process group: freed after it, at exit, gloo's destructor could wait for
        # the GIL that the exiting thread holds (seen: a process that never ended)
        r.train_model = None
        dist.barrier()
        dist.destroy_process_group()
    if stop["signal"]:
        r.log(f"stopped by signal {stop['signal']} at step {step}; continue with --init_from=resume "
              f"--out_dir={out_dir}")
        sys.exit(128 + stop["signal"])
    if r.rank == 0 and r.saved != step:  # the last checkpoints were refused: this run did not end well
        raise SystemExit(f"error: training stopped at step {step}, but its checkpoints after step {r.saved or 0} "
                         f"were not saved (see above). {last_good(r)}")
    r.log(f"done: {step} steps; the checkpoint is {os.path.join(out_dir, 'ckpt.pt')}")


def agree(loss, stop, world, dev, due):
    """Under torchrun, at a log line: the mean loss over the processes; and the signal that
    any of them received becomes stop["signal"] on all, as a checkpoint any of them finds
    due (ckpt_minutes) becomes due on all, so that they save and stop at the same step
    (gathering the random states is collective, and under FSDP so is saving)."""
    mean, flags = torch.tensor(loss.item() / world, device=dev), torch.tensor([stop["received"] or 0, due], device=dev)
    dist.all_reduce(mean)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop["signal"] = int(flags[0]) or None
    return mean, bool(flags[1])


def write_log(r, log_file, row):
    """A row of log.jsonl, on process 0; and of the wandb run, when there is one."""
    if log_file is not None:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
    if r.tracker is not None:
        r.tracker.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, prepare.DownloadError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
