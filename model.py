"""
model.py: a GPT in one file: GPT-2 and Llama-style blocks, pretrained weights, KV cache.

One model, with knobs (GPTConfig) that make it GPT-2 (LayerNorm, GELU MLP, learned
positions, biases), Llama (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, no
biases), or any mix of the two:

    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=4096))
    logits, loss = model(idx, targets)                      # idx, targets: (B, T) token ids
    model = GPT.from_pretrained("gpt2")                     # or HuggingFaceTB/SmolLM2-135M, or a directory
    out = model.generate(idx, max_new_tokens=100, top_p=0.9)  # KV cache: one prefill, then one token a step

Attention runs flash.py's Triton kernel on CUDA and torch's scaled_dot_product_attention
elsewhere (the same math). Packed documents can be kept apart (doc_starts): tokens then
attend only within their own document, and RoPE positions restart at each document.
Training with targets can compute the head and loss a chunk of tokens at a time
(loss_chunk), and the NanoGPT speedrun's options (relu2, qk_norm, logit_softcap,
zero_init_proj, value_embeds, skips) are off by default. LoRA adapters wrap linear layers; a model goes out
to the Hugging Face format with `python model.py export CKPT DIR`.
Read next: flash.py, the attention kernel; then train.py.
"""
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import bpe  # atomic writes
import prepare  # the downloader, for from_pretrained(name)


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # the embedding and output rows are padded to a multiple of 64
    block_size: int = 1024  # the longest sequence
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # grouped-query attention: key/value heads, dividing n_head; 0 means n_head
    n_embd: int = 768
    mlp_hidden: int = 0  # 0 means 4 * n_embd
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (GPT-2's tanh approximation), "swiglu" (Llama) or "relu2" (relu(x)^2, So et al. 2021)
    pos: str = "learned"  # "learned" (GPT-2) or "rope" (Llama)
    rope_theta: float = 10000.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the output head is the token embedding
    attn: str = "auto"  # "flash" (flash.py), "sdpa" (torch), or "auto": flash on CUDA, sdpa elsewhere
    # from the NanoGPT speedrun (off by default: GPT-2 and Llama have none of them)
    qk_norm: bool = False  # RMS-normalize each head's queries and keys: attention logits stay bounded
    logit_softcap: float = 0.0  # the output logits as cap * tanh(logits / cap); 0: off
    zero_init_proj: bool = False  # the projections into the residual stream start at zero: each block starts as identity
    value_embeds: bool = False  # every layer adds a token embedding to its values (layers i and n_layer-1-i share it)
    skips: bool = False  # U-net skips: the second half's blocks also take the first half's outputs, learned-weighted
    # how training runs, not what it computes (checkpoints carry them; train.py sets them from its settings):
    loss_chunk: int = 0  # tokens per chunk through the output head + loss (ChunkedCrossEntropy); 0: all at once
    activation_checkpointing: bool = False  # keep only each block's input, recompute the rest in the backward

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        for key, choices in [("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu", "relu2")),
                             ("pos", ("learned", "rope")), ("attn", ("auto", "flash", "sdpa"))]:
            if getattr(self, key) not in choices:
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)!r}: choose one of {choices}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}, "
                             f"and n_kv_head={self.n_kv_head} must divide n_head")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_dim}")
        if not (isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
            raise ValueError(f"GPTConfig.loss_chunk={self.loss_chunk!r}: tokens per chunk, 0 (all at once) or more")
        if not self.logit_softcap >= 0:
            raise ValueError(f"GPTConfig.logit_softcap={self.logit_softcap!r}: 0 (off) or a positive cap")
        if self.logit_softcap and self.loss_chunk:
            raise ValueError("GPTConfig.logit_softcap with loss_chunk: the chunked loss has no soft-capping; "
                             "set loss_chunk=0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // 64) * 64  # rounded up: matmuls run faster on multiples of 64

# -----------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg):
    """cos and sin of position * theta^(-2i/head_dim), as (block_size, head_dim / 2) tables."""
    inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates each pair (x[i], x[i + d/2]) of every head by its angle (Su et al. 2021; the
    halves layout of Llama's weights). x: (B, T, H, D); cos, sin: (T, D/2) or (B, T, D/2)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rope, docs, cache, ve=None):
        cfg, (B, T, _) = self.cfg, x.shape
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        if ve is not None:  # value_embeds: (B, T, Hkv * D), looked up from the tokens themselves
            v = v + ve
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if cfg.qk_norm:  # before RoPE, which keeps norms
            q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # keys and values of earlier positions come from the cache
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, docs, cfg.attn)  # (B, T, H, D)
        return self.proj(y.reshape(B, T, H * D))


def attend(q, k, v, docs, attn):
    """Causal attention. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Tk >= Tq (the newest
    Tq keys are the queries' own positions: the diagonal aligns bottom-right). docs:
    None, or (doc_ids, cu_seqlens) to keep packed documents apart."""
    if attn == "flash" or (attn == "auto" and q.is_cuda):
        import flash  # imported here: triton is needed only on this path
        if docs is None:
            return flash.flash_attn(q, k, v, causal=True)
        B, T, H, D = q.shape
        y = flash.flash_attn_varlen(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                    docs[1], T, causal=True)
        return y.view(B, T, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, H, T, D)
    Tq, Tk = q.shape[2], k.shape[2]
    mask = None
    if docs is not None:  # block-diagonal causal: same document, and not in the future
        doc_ids = docs[0]
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :]).tril().unsqueeze(1)  # (B, 1, T, T)
    elif Tq != Tk and Tq > 1:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and Tq == Tk,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        # SwiGLU (Shazeer 2020) keeps two projections, gate and up, in one matmul
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope, docs, cache, ve=None):
        x = x + self.attn(self.norm1(x), rope, docs, cache, ve)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """Keys and values of every layer, preallocated for `length` positions. Under GQA it
    holds only the n_kv_head heads."""

    def __init__(self, cfg, batch, length, device, dtype):
        shape = (batch, length, cfg.n_kv_head, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions filled so far; GPT.forward advances it

    def update(self, layer, k, v):
        end = self.pos + k.shape[1]
        self.k[layer][:, self.pos:end], self.v[layer][:, self.pos:end] = k, v
        return self.k[layer][:, :end], self.v[layer][:, :end]

# -----------------------------------------------------------------------------
# The loss, a chunk of tokens at a time


class ChunkedCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets) without ever holding all the logits. For GPT-2
    at 8 x 1024 tokens those are 8192 x 50304 floats, 1.6 GB, and the plain path (in
    GPT.forward, the reference) keeps three such: the logits, their log-softmax and its
    gradient. Here the forward takes `chunk` tokens at a time and, since the loss's
    gradient with respect to the logits is softmax - onehot(target), computes their
    gradients on the spot, while the chunk's logits are at hand:

        dx[chunk] = (softmax - onehot) @ weight        dweight += (softmax - onehot).T @ x[chunk]

    The backward only scales dx and dweight. The matmuls are the plain path's three, and
    the peak is one chunk's logits plus dx and dweight, the sizes of x and weight: O(chunk
    x vocab), not O(tokens x vocab). As Liger Kernel's fused linear cross-entropy (2024)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk):
        # x: (N, C) hidden states; weight: (Vp, C), the padded vocabulary; targets: (N,), -1 to skip
        device = x.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype  # autocast's choice
        grads = any(ctx.needs_input_grad[:2])  # not under no_grad (evaluation)
        w = weight.to(dt)
        dx = torch.empty_like(x) if grads else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if grads else None  # accumulated in fp32
        loss = torch.zeros((), device=x.device)
        with torch.autocast(device, enabled=False):  # the dtypes are explicit here
            for i in range(0, len(x), chunk):  # a call a chunk: its (c, Vp) tensors are freed as it returns
                loss += ChunkedCrossEntropy.one_chunk(x[i:i + chunk].to(dt), w, targets[i:i + chunk], vocab_size,
                                                      dx[i:i + chunk] if grads else None, dw)
        n = (targets >= 0).sum()  # the loss is the mean over the tokens that have targets
        ctx.save_for_backward(dx, dw, n)
        return loss / n

    @staticmethod
    def one_chunk(x, w, t, vocab_size, dx, dw):
        """The summed loss of c tokens, x: (c, C), t: (c,); with dx (c, C) given, their
        gradients go into dx and are added into dw (Vp, C)."""
        keep = (t >= 0).unsqueeze(1)  # (c, 1): this token has a target
        t = t.clamp(min=0).unsqueeze(1)  # (c, 1); skipped tokens count 0 below
        logits = (x @ w.T).float()  # (c, Vp): the only vocabulary-sized tensors are this and logp
        logits[:, vocab_size:] = float("-inf")  # padding: zero probability, as in the plain path
        logp = torch.log_softmax(logits, dim=1)
        loss = -(logp.gather(1, t) * keep).sum()
        if dx is None:
            return loss
        g = logp.exp_()  # the softmax, in place
        g.scatter_add_(1, t, -torch.ones_like(t, dtype=g.dtype))  # minus onehot: d loss / d logits
        g = g.to(x.dtype)
        dx.copy_((g @ w) * keep)  # skipped tokens get no gradient
        if dw.dtype == x.dtype:
            dw.addmm_(g.T, x * keep)  # in place: no (Vp, C) temporary
        else:  # a bf16 or fp16 matmul, accumulated in fp32
            dw += (g.T @ (x * keep)).float()
        return loss

    @staticmethod
    def backward(ctx, grad):
        dx, dw, n = ctx.saved_tensors
        scale = grad / n
        return dx * scale, dw * scale, None, None, None  # autograd casts dw to the weight's dtype


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        # the speedrun's value embeddings: weights that cost a lookup, not a matmul. Layer i
        # and layer n_layer-1-i share table i (the first and the last layers see the tokens)
        tables = (cfg.n_layer + 1) // 2 if cfg.value_embeds else 0
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.padded_vocab, cfg.n_kv_head * cfg.head_dim)
                                          for _ in range(tables)) if tables else None
        # U-net skips: block n_layer-1-i also adds skip_weights[i] * (block i's output)
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.skips else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2's init: N(0, 0.02), and the projections that add into the residual stream
        # scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and cfg.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), for MFU: 6 per weight of every
        matmul (2 forward, 4 backward; the output head included, the embedding lookups
        not), plus attention's QK^T and AV: 2 matmuls x 2 FLOPs x seq_len x n_head x
        head_dim, forward, times 3: 12 * n_layer * n_head * head_dim * seq_len. As in
        PaLM (Chowdhery et al. 2022) and nanoGPT, not halved for the causal mask."""
        cfg = self.cfg
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul += 0 if self.lm_head is not None else self.wte.weight.numel()
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def forward(self, idx, targets=None, doc_starts=None, cache=None, all_logits=False):
        """idx, targets: (B, T) ids; the loss skips targets of -1. doc_starts: (B, T) bool,
        True where a document starts (at its end-of-text token), to keep packed documents
        apart. cache: a KVCache for generation. Returns (logits, loss); without targets,
        logits only for the last position unless all_logits; with targets and
        cfg.loss_chunk, no logits (None): the loss is computed a chunk of tokens at a time."""
        cfg, (B, T) = self.cfg, idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens, but block_size is {cfg.block_size}")
        docs = None
        if doc_starts is not None:
            if cache is not None:
                raise ValueError("doc_starts and a KV cache cannot be combined")
            t = torch.arange(T, device=idx.device)
            first = torch.where(doc_starts, t, 0).cummax(dim=1).values  # where each token's document starts
            pos = t - first  # (B, T): positions restart in every document
            starts = doc_starts.clone()
            starts[:, 0] = True
            cu_seqlens = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T).int()
            docs = (starts.cumsum(1), cu_seqlens)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if cfg.pos == "rope" else None
        L, outputs = cfg.n_layer, []  # the first half's outputs, for the skips
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= L - L // 2:  # the second half: the mirror block's output
                x = x + self.skip_weights[L - 1 - i] * outputs[L - 1 - i]
            ve = self.value_embeds[min(i, L - 1 - i)](idx) if self.value_embeds is not None else None
            if cfg.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                # only the block's input is kept for the backward, which runs the block again
                # to get the rest: about a third more compute for a fraction of the memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, docs, None, ve, use_reentrant=False)
            else:
                x = block(x, rope, docs, cache, ve)
            if self.skip_weights is not None and i < L // 2:  # kept only where a skip will read it
                outputs.append(x)
        if cache is not None:
            cache.pos += T
        x = self.norm_f(x)
        head = self.lm_head.weight if self.lm_head is not None else self.wte.weight  # (Vp, C)
        if targets is not None and cfg.loss_chunk:  # the logits never exist whole; none are returned
            loss = ChunkedCrossEntropy.apply(x.flatten(0, 1), head, targets.flatten(), cfg.vocab_size, cfg.loss_chunk)
            return None, loss
        if targets is None and not all_logits:
            x = x[:, -1:]  # generation needs only the next token's distribution
        logits = F.linear(x, head)  # (B, T, Vp)
        if cfg.logit_softcap:  # smoothly bounded to (-cap, cap)
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if cfg.padded_vocab > cfg.vocab_size:
            logits[..., cfg.vocab_size:] = float("-inf")  # padding: zero probability, in the loss too
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :cfg.vocab_size], loss

    # --- generation ---

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_id=None, generator=None):
        """Samples max_new_tokens after idx (B, T) and returns (B, T + new). A row that
        produces eot_id is padded with eot_id from there, and generation stops once
        every row has."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, eot_id, generator))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    @torch.inference_mode()  # lighter than no_grad (no version counters): ~15% faster decoding on a CPU
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot_id=None,
                        generator=None):
        """Yields the next token of every row, (B,), one step at a time: one prefill of the
        prompt into a KV cache, then one-token steps. When the cache is full, the last
        half block is prefilled again, so generation can run past block_size."""
        B, window = idx.shape[0], self.cfg.block_size
        dtype = next(self.parameters()).dtype
        context, done = idx[:, -window:], torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = token = None
        for _ in range(max_new_tokens):
            if cache is None or cache.pos == window:
                context = context[:, -max(1, window // 2):] if cache is not None else context
                cache = KVCache(self.cfg, B, window, idx.device, dtype)
                logits, _ = self(context, cache=cache)
            else:
                logits, _ = self(token[:, None], cache=cache)
            token = sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if eot_id is not None:
                token = torch.where(done, eot_id, token)
                done |= token == eot_id
            context = torch.cat([context, token[:, None]], dim=1)
            yield token
            if eot_id is not None and done.all():
                return

    # --- pretrained weights ---

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl), SmolLM2 (HuggingFaceTB/SmolLM2-135M,
        -360M), or a directory with a Hugging Face config.json + model.safetensors of either
        family. Downloads go to data/pretrained/. overrides: GPTConfig fields such as attn."""
        directory = prepare.pretrained_dir(name_or_dir, ["config.json", "model.safetensors"])
        with open(os.path.join(directory, "config.json")) as f:
            cfg = config_from_hf(json.load(f), **overrides)
        model = cls(cfg)
        path = os.path.join(directory, "model.safetensors")
        weights = hf_to_ours(load_safetensors(path), cfg)
        ours = model.state_dict()
        for name, t in weights.items():
            if name not in ours:
                raise ValueError(f"{path}: tensor {t.hf_name!r} has no place in the model")
            target = ours[name]
            if name in ("wte.weight", "lm_head.weight") and t.shape[0] <= target.shape[0]:
                target = target[:t.shape[0]]  # the padded rows stay as initialised
            if t.shape != target.shape:
                raise ValueError(f"{path}: tensor {t.hf_name!r} has shape {tuple(t.shape)}, the model "
                                 f"expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(t)
        missing = sorted(set(ours) - set(weights))
        if missing:
            raise ValueError(f"{path}: no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return model


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy when temperature is 0, else from
    softmax(logits / temperature) filtered by top-k, then top-p."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: it must be 0 (greedy) or more")
    if temperature == 0:
        return logits.argmax(-1)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature  # no overflow at tiny temperatures
    probs = F.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    except RuntimeError:  # on a CPU; CUDA asserts on the device instead
        raise ValueError("the model's probabilities are not finite (NaN or inf): its weights are broken") from None


def filter_logits(logits, top_k=None, top_p=None):
    """Sets to -inf every logit outside the top_k largest, then outside the nucleus: the
    smallest set of tokens whose probabilities add up to top_p (Holtzman et al. 2019)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        outside[..., 0] = False  # the most likely token always stays
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits

# -----------------------------------------------------------------------------
# LoRA: fine-tuning a few added weights while the model's own stay frozen


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021):
        y = W x + b + s * B A x,    A: (r, in), B: (out, r), s = alpha / r
    B starts at zero, so the model starts exactly as the base. rsLoRA (Kalajdzievski 2023)
    scales by alpha / sqrt(r) instead, so that high ranks still learn. DoRA (Liu et al.
    2024) also learns each output row's length m and keeps only the direction of the
    updated weight: y = m * (W + s B A) x / ||W + s B A||_row + b."""

    def __init__(self, base, rank, alpha, dropout, variant):
        super().__init__()
        self.base, self.dropout = base, nn.Dropout(dropout)
        self.scale = alpha / (math.sqrt(rank) if variant == "rslora" else rank)
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.m = nn.Parameter(base.weight.detach().float().norm(dim=1)) if variant == "dora" else None  # (out,)

    def forward(self, x):
        update = self.scale * F.linear(F.linear(self.dropout(x), self.A), self.B)
        if self.m is None:
            return self.base(x) + update
        # the row norms count as constants in the backward pass, as DoRA's paper proposes
        # (its section 4.3): much less memory, and the same results
        norm = (self.base.weight + self.scale * self.B @ self.A).norm(dim=1).detach()
        g = self.m / norm  # (out,): 1 at the start, so that y is exactly the base layer's
        y = self.base(x)
        wx = y if self.base.bias is None else y - self.base.bias
        return y + (g - 1) * wx + g * update  # = g * (W x + update) + b

    def merged(self):
        """The plain linear layer that computes the same: W + s B A, for DoRA rescaled per row."""
        w = self.base.weight + self.scale * self.B @ self.A
        if self.m is not None:
            w = w * (self.m / w.norm(dim=1))[:, None]
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out.weight.data, out.bias = w.detach().to(self.base.weight.dtype), self.base.bias
        return out.to(self.base.weight.device)


LORA_TARGETS = {"qkv": "attn.qkv", "attn_proj": "attn.proj", "fc": "mlp.fc", "mlp_proj": "mlp.proj",
                "attn": "attn.qkv,attn.proj", "mlp": "mlp.fc,mlp.proj"}  # names, and shorthands for two each


def lora_layers(targets):
    """The block layers that a `lora_targets` setting names: "attn,mlp", "qkv,fc", ..."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets={targets!r}: choose from {', '.join(LORA_TARGETS)}, comma-separated")
    return sorted({layer for t in names for layer in LORA_TARGETS[t].split(",")})


def add_lora(model, rank, alpha, dropout, targets, variant):
    """Freezes every weight of the model and wraps the target layers of every block in
    LoRALinear: from here on, only the adapters train. Returns the model."""
    if variant not in ("lora", "rslora", "dora"):
        raise ValueError(f"lora_variant={variant!r}: choose lora, rslora or dora")
    model.requires_grad_(False)
    for block in model.blocks:
        for layer in lora_layers(targets):
            parent, name = layer.split(".")
            linear = getattr(getattr(block, parent), name)
            if not 1 <= rank <= min(linear.in_features, linear.out_features):
                raise ValueError(f"lora_rank={rank}: it must be 1 to {layer}'s smaller dimension "
                                 f"({linear.in_features} in, {linear.out_features} out)")
            setattr(getattr(block, parent), name, LoRALinear(linear, rank, alpha, dropout, variant))
    return model


def merge_lora(model):
    """Every LoRALinear replaced by the plain layer it equals: a model as fast as the base."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return model.requires_grad_(True)


def fingerprint(model):
    """A short hash of a model's weights (the first and last values of every tensor), to
    tell that a LoRA checkpoint's base is still the one it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().float().flatten().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode() + torch.cat([flat[:8], flat[-8:]]).numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# Where it runs: the device, the dtype, and train.py's checkpoints (train.py and sample.py share these)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name=""):
    """The torch.device for a `device` setting: "" picks cuda, then mps, then cpu."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not have.get(dev.type):
        raise ValueError(f"device={name!r}, but this machine's torch {torch.__version__} has no {dev.type} device; "
                         "leave device empty to pick what is there")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def pick_dtype(dev, name=""):
    """The compute dtype for a `dtype` setting: "" picks bf16 on CUDA (fp16 where the GPU
    has no bf16), and fp32 elsewhere."""
    if not name:
        name = "fp32" if dev.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return DTYPES[name]


def load_checkpoint(path):
    """A checkpoint that train.py wrote (a dict: see train.save_checkpoint), on the CPU,
    with "path" added: where it was read from. A sharded one (train.py's parallel="fsdp")
    holds no weights itself but names its directory of shards, which is checked here to be
    whole; model_from_checkpoint reads them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only=False: it also holds numpy's RNG state; only load checkpoints you trust
        ckpt = dict(torch.load(path, map_location="cpu", weights_only=False), path=path)
        if "shards" in ckpt:
            check_shards(shards_dir(ckpt))
        return ckpt
    except Exception as e:  # torch raises many kinds for a cut-off or damaged file
        prev = os.path.join(os.path.dirname(path), "ckpt.prev.pt")
        fix = f"copy {prev}, the one before it, over it to go back one checkpoint, or " if os.path.exists(prev) else ""
        why = (str(e).strip().splitlines() or [""])[0][:300]  # one line: some errors hold a traceback
        raise ValueError(f"{path} is damaged or cut short and cannot be read ({type(e).__name__}: {why}); "
                         f"{fix}start the run over") from None


def shards_dir(ckpt):
    """The directory of a sharded checkpoint's weights and optimizer state: beside ckpt.pt."""
    return os.path.join(os.path.dirname(ckpt["path"]), ckpt["shards"])


def check_shards(directory):
    """Raises unless a directory of shards (torch.distributed.checkpoint's format) is whole:
    its .metadata, which process 0 writes last, and every byte that it maps to the files
    of the processes. Reads the metadata only, not the tensors."""
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(directory).read_metadata()
    ends = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in ends.items():
        size = os.path.getsize(os.path.join(directory, name)) if os.path.exists(os.path.join(directory, name)) else 0
        if size < end:
            raise ValueError(f"{directory}/{name} holds {size} bytes of {end}: a process's shard is missing or cut "
                             "short (on several nodes, out_dir must be on a filesystem that all of them share)")


def read_shards(ckpt, state, no_dist=True):
    """Fills `state`, {"model": {name: tensor}, ...} as train.py saved it, in place from a
    sharded checkpoint, whatever the number of processes that wrote it: each tensor is put
    together from the pieces in the files that hold them (a DTensor gets just its own shard).
    no_dist: this process reads alone; else all processes of the run read together."""
    import torch.distributed.checkpoint as dcp
    try:
        with warnings.catch_warnings():  # DCP warns whenever one process reads alone, which is meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=shards_dir(ckpt), no_dist=no_dist)
    except (dcp.CheckpointException, RuntimeError) as e:  # a name or shape the checkpoint lacks
        raise ValueError(f"{ckpt['path']}: its shards in {shards_dir(ckpt)} do not fit the model: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    return state


def model_from_checkpoint(ckpt, weights=True):
    """The model of a train.py checkpoint. A LoRA checkpoint holds only the adapters: its
    base is loaded again from where it names (a checkpoint file, a pretrained name or a
    directory), checked to be the same weights, and the adapters go on top. A sharded
    checkpoint's weights are put together whole from its shards. weights=False leaves the
    model (or its adapters) as initialised: train.py reads the shards once it has sharded it."""
    lora = ckpt.get("lora")
    if lora is None:
        model = GPT(GPTConfig(**ckpt["model_config"]))
    else:
        model = load_base(lora["base"])
        if fingerprint(model) != lora["fingerprint"]:
            raise ValueError(f"the LoRA base {lora['base']} is not the model the adapters were trained on "
                             "(its weights changed); restore it, or train the adapters again")
        add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], lora["variant"])
    if not weights:
        return model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = ckpt["model"] if "shards" not in ckpt else read_shards(ckpt, {"model": {
        k: t for k, t in model.state_dict().items() if lora is None or k in trainable}})["model"]
    missing, unexpected = model.load_state_dict(saved, strict=lora is None)
    if unexpected or trainable & set(missing):
        raise ValueError(f"the checkpoint's adapters do not fit its LoRA settings: {(unexpected or missing)[:3]}")
    return model


def run_with(model, **options):
    """Sets how a model runs, not what it computes (GPTConfig's attn, loss_chunk,
    activation_checkpointing), checked as a new GPTConfig would be. Every module holds
    the one model.cfg, so they all see the change."""
    replace(model.cfg, **options)
    for key, value in options.items():
        setattr(model.cfg, key, value)
    return model


def load_base(name_or_path):
    """A model to fine-tune: a train.py checkpoint file (LoRA adapters merged in), or
    pretrained weights by name or directory."""
    if os.path.isfile(name_or_path):
        return merge_lora(model_from_checkpoint(load_checkpoint(name_or_path)))
    return GPT.from_pretrained(name_or_path)


# -----------------------------------------------------------------------------
# Hugging Face checkpoints: config.json, safetensors, and the names of the weights


# GPTConfig field -> Hugging Face config.json key, for each family; and the settings that
# make a GPTConfig that family. Read one way by config_from_hf, the other by config_to_hf.
HF_CONFIG = {
    "gpt2": {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head",
             "n_embd": "n_embd", "mlp_hidden": "n_inner", "norm_eps": "layer_norm_epsilon",
             "tie_embeddings": "tie_word_embeddings"},
    "llama": {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
              "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
              "mlp_hidden": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
              "tie_embeddings": "tie_word_embeddings"}}
HF_FAMILY = {"gpt2": dict(norm="layernorm", mlp="gelu", pos="learned"),
             "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False)}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def config_from_hf(hf, **overrides):
    """A GPTConfig from a Hugging Face config.json of the gpt2 or llama family."""
    kind = hf.get("model_type")
    if kind not in HF_CONFIG:
        raise ValueError(f"model_type {kind!r} is not supported: use a gpt2 or llama checkpoint")
    if kind == "gpt2":
        unsupported = [what for what, used in [
            (f"the activation {hf.get('activation_function')!r}",
             hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
            ("unscaled attention", not hf.get("scale_attn_weights", True)),
            ("attention scaled by layer", hf.get("scale_attn_by_inverse_layer_idx")),
            ("reordered attention", hf.get("reorder_and_upcast_attn"))] if used]
    else:
        hf = dict(hf, rope_theta=(hf.get("rope_parameters") or hf).get("rope_theta", 10000.0))
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
        unsupported = [what for what, used in [
            ("RoPE scaling", hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default")
             != "default"),
            ("biases", hf.get("attention_bias") or hf.get("mlp_bias")),
            (f"the activation {hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
            ("a head_dim that does not split hidden_size", hf.get("head_dim", width // heads) * heads != width)]
            if used]
    if unsupported:
        raise ValueError(f"this {kind} config uses {', '.join(unsupported)}, which model.py does not have")
    kw = {ours: hf[key] for ours, key in HF_CONFIG[kind].items() if hf.get(key) is not None}
    kw.setdefault("tie_embeddings", kind == "gpt2")  # each family's default when config.json does not say
    return GPTConfig(**{**HF_FAMILY[kind], **kw, **overrides})


def config_to_hf(cfg, eot_id=None):
    """A Hugging Face config.json for a GPTConfig: GPT2LMHeadModel for GPT-2's settings
    (bias=False too: exported as zero biases, which is exact), LlamaForCausalLM for
    Llama's. A mix that neither class has is an error that names the setting."""
    for kind, family in HF_FAMILY.items():
        if cfg.norm == family["norm"]:
            break
    clash = [f"{k}={getattr(cfg, k)!r}" for k, v in family.items() if getattr(cfg, k) != v]
    if kind == "gpt2" and cfg.n_kv_head != cfg.n_head:
        clash.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
    clash += [f"{k}={getattr(cfg, k)!r} (neither class has it)"
              for k in ("qk_norm", "logit_softcap", "value_embeds", "skips") if getattr(cfg, k)]
    if clash:
        raise ValueError(f"no transformers class has norm={cfg.norm!r} with {', '.join(clash)}: for "
                         f"{HF_CLASS[kind]}, set {', '.join(f'{k}={v!r}' for k, v in family.items())}")
    hf = {key: getattr(cfg, ours) for ours, key in HF_CONFIG[kind].items()}
    hf.update(architectures=[HF_CLASS[kind]], model_type=kind, bos_token_id=eot_id, eos_token_id=eot_id,
              torch_dtype="float32")
    if kind == "gpt2":
        hf.update(activation_function="gelu_new", n_inner=None if cfg.mlp_hidden == 4 * cfg.n_embd else cfg.mlp_hidden)
    else:
        hf.update(hidden_act="silu", attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
    return hf


def hf_names(cfg):
    """The name table between our weights and Hugging Face's, read both ways: one row per
    tensor of ours, (our name, [(Hugging Face name, its rows)], transposed). Several of
    theirs are stacked on rows into one of ours: Llama's q, k, v projections into our qkv,
    and gate and up into our fc. GPT-2's Conv1D layers store weights as (in, out):
    transposed. The embedding's rows are the vocabulary, not padded."""
    H, Hkv, D, V = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size
    if cfg.norm == "layernorm":  # GPT-2
        rows = [("wte.weight", [("wte.weight", V)], False), ("wpe.weight", [("wpe.weight", None)], False)]
        for i in range(cfg.n_layer):
            for ours, hf in [("norm1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("norm2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
                rows += [(f"blocks.{i}.{ours}.weight", [(f"h.{i}.{hf}.weight", None)], not ours.startswith("norm")),
                         (f"blocks.{i}.{ours}.bias", [(f"h.{i}.{hf}.bias", None)], False)]
        rows += [("norm_f.weight", [("ln_f.weight", None)], False), ("norm_f.bias", [("ln_f.bias", None)], False)]
    else:  # Llama
        rows = [("wte.weight", [("model.embed_tokens.weight", V)], False)]
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            for ours, hf in [("norm1", [("input_layernorm", None)]),
                             ("attn.qkv", [("self_attn.q_proj", H * D), ("self_attn.k_proj", Hkv * D),
                                           ("self_attn.v_proj", Hkv * D)]),
                             ("attn.proj", [("self_attn.o_proj", None)]), ("norm2", [("post_attention_layernorm", None)]),
                             ("mlp.fc", [("mlp.gate_proj", cfg.mlp_hidden), ("mlp.up_proj", cfg.mlp_hidden)]),
                             ("mlp.proj", [("mlp.down_proj", None)])]:
                rows.append((f"blocks.{i}.{ours}.weight", [(p + h + ".weight", n) for h, n in hf], False))
        rows.append(("norm_f.weight", [("model.norm.weight", None)], False))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", [("lm_head.weight", V)], False))
    return rows


def hf_to_ours(tensors, cfg):
    """Hugging Face weights renamed (and stacked, transposed) as ours, by hf_names. Every
    tensor must be used. Each returned tensor has .hf_name, for error messages."""
    # GPT-2's names may start with "transformer."; its causal-mask buffers are not weights
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()
               if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a copy of the embedding, if saved at all
    out = {}
    for ours, parts, transposed in hf_names(cfg):
        names = [n for n, _ in parts]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"no tensor {missing[0]!r} in the checkpoint")
        parts = [t.t() if transposed else t for t in (tensors.pop(n) for n in names)]
        out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
        out[ours].hf_name = names[0]
    if tensors:
        raise ValueError(f"unused tensor {next(iter(tensors))!r} in the checkpoint: it does not fit this config")
    return out


def ours_to_hf(state, cfg):
    """Our weights named (split, transposed, unpadded) as Hugging Face's, by hf_names: the
    inverse of hf_to_ours. A GPT-2 without biases gets zero biases, which is exact."""
    out = {}
    for ours, parts, transposed in hf_names(cfg):
        t = state.get(ours)
        if t is None:  # a bias of bias=False
            t = torch.zeros(state[ours.replace(".bias", ".weight")].shape[0 if not transposed else 1])
        t = t.detach().t() if transposed else t.detach()
        start = 0
        for name, rows in parts:
            rows = rows or (t.shape[1] if transposed else t.shape[0])
            piece = t[:, start:start + rows] if transposed else t[start:start + rows]
            out[name], start = piece.contiguous(), start + rows
    return out


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_safetensors(path):
    """name -> tensor from a .safetensors file: 8 bytes (little-endian u64) giving the
    header's length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
    little-endian data; the offsets count from its start and tile it, without gaps."""
    size = os.path.getsize(path)
    tensors = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if size < 8 or n > size - 8:
                raise ValueError(f"it has {size} bytes, too few for its header")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            header.pop("__metadata__", None)
            end = 0
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):  # in file order
                dtype, shape, (begin, stop) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, not a float type")
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(f"tensor {name!r} has the shape {shape}")
                want = math.prod(shape) * dtype.itemsize
                if begin != end or stop - begin != want or 8 + n + stop > size:
                    raise ValueError(f"tensor {name!r} should have {want} bytes from {end} of the data, but its "
                                     f"offsets are {begin}..{stop} (the file has {size - 8 - n}: a truncated download?)")
                end = stop
                f.seek(8 + n + begin)
                data = bytearray(f.read(want))
                tensors[name] = (torch.frombuffer(data, dtype=dtype) if want else torch.empty(0, dtype=dtype)).reshape(shape)
            if 8 + n + end != size:
                raise ValueError(f"{size - 8 - n - end} bytes after the last tensor")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """The inverse of load_safetensors: name -> tensor written as a .safetensors file,
    atomically. The JSON header is padded with spaces to a multiple of 8 bytes, so every
    tensor's data starts aligned. Tensors that share memory (tied weights) must be given
    once: the format has no shared storage."""
    dtype_names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata or {}}, 0
    for name, t in tensors.items():
        if t.dtype not in dtype_names:
            raise ValueError(f"tensor {name!r} is {t.dtype}: safetensors here holds {', '.join(dtype_names.values())}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with bpe.atomic_write(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            t = t.detach().cpu().contiguous()
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
            f.write(raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes())  # little-endian

# -----------------------------------------------------------------------------
# Export: a train.py checkpoint as a Hugging Face model directory, which transformers
# loads with no code of ours: python model.py export out/x/ckpt.pt hf/x [--push_to=USER/NAME]


def export_hf(ckpt_path, out, dtype="fp32"):
    """Writes out/: config.json, model.safetensors, generation_config.json, the tokenizer
    (tokenizer.json, and GPT-2's vocab.json + merges.txt where they came from) and a model
    card, README.md. LoRA adapters are merged in. Each file is written atomically."""
    ckpt = load_checkpoint(ckpt_path)
    m = merge_lora(model_from_checkpoint(ckpt))
    spec = ckpt["tokenizer"]
    tok = bpe.load_tokenizer(spec["name"], files=spec["files"], where=ckpt_path, fast=False)
    eot = tok.eot_id
    hf = config_to_hf(m.cfg, eot) | {"torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]}
    os.makedirs(out, exist_ok=True)
    files = {"config.json": json.dumps(hf, indent=2),
             "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                                   "max_length": m.cfg.block_size}, indent=2),
             "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bpe.EOT,
                                                  "eos_token": bpe.EOT, "model_max_length": m.cfg.block_size,
                                                  "clean_up_tokenization_spaces": False} if eot is not None else
                                                 {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)}
    # a pretrained model's own tokenizer.json goes as it was; any other is written anew
    files["tokenizer.json"] = spec["files"].get("tokenizer.json") or tok.to_hf_json()
    if spec["name"] in ("gpt2", "vocab.json"):  # GPT-2's own two files too, for its slow tokenizer
        files["vocab.json"], files["merges.txt"] = tok.to_gpt2_files()
    files["README.md"] = model_card(ckpt, m, hf)
    for name, text in files.items():
        with bpe.atomic_write(os.path.join(out, name)) as f:
            f.write(text)
    weights = {k: v.to(DTYPES[dtype]) for k, v in ours_to_hf(m.state_dict(), m.cfg).items()}
    save_safetensors(weights, os.path.join(out, "model.safetensors"), {"format": "pt"})
    return out


def model_card(ckpt, m, hf):
    """README.md for the Hub: what the model is, what it was trained on, how well it did."""
    s = ckpt["settings"]
    log = os.path.join(os.path.dirname(ckpt["path"]), "log.jsonl")
    evals = [json.loads(line) for line in open(log) if "val_bpb" in line] if os.path.exists(log) else []
    lora = ckpt.get("lora")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# {os.path.basename(os.path.dirname(os.path.abspath(ckpt["path"])))}

A {m.num_params() / 1e6:.1f}M-parameter {hf["architectures"][0]} ({m.cfg.n_layer} layers, {m.cfg.n_embd} wide,
{m.cfg.n_head} heads, context {m.cfg.block_size}), trained from scratch with an LLM-from-scratch codebase in
the spirit of nanoGPT{f", then fine-tuned with {lora['variant']} (rank {lora['rank']}, merged in)" if lora else ""}.

- data: `{s["dataset"]}`, tokenizer `{ckpt["tokenizer"]["name"]}` ({m.cfg.vocab_size} tokens)
- training: {ckpt["step"]} steps of {s["total_batch_size"]:,} tokens ({ckpt["step"] * s["total_batch_size"]:,} tokens),
  learning rate {s["learning_rate"]} ({s["schedule"]})
- {f'validation: {evals[-1]["val_bpb"]:.4f} bits per byte, loss {evals[-1]["val_loss"]:.4f} (step {evals[-1]["step"]})'
   if evals else "validation: no log.jsonl was found beside the checkpoint"}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
print(tok.decode(model.generate(**tok("def main(", return_tensors="pt"), max_new_tokens=50, do_sample=True)[0]))
```

No license was chosen when this card was written: set one before you share the model.
"""


def push_to_hub(directory, repo):
    """Uploads the directory to a Hub model repo with the official client, which handles
    large files (LFS/Xet); imported only here, so the rest needs no huggingface_hub."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("uploading needs huggingface_hub: pip install huggingface_hub, or upload the directory with "
                         f"`hf upload {repo} {directory} .`") from None
    if not os.environ.get("HF_TOKEN"):
        raise ValueError("uploading needs HF_TOKEN: a token with write access (huggingface.co/settings/tokens)")
    api = huggingface_hub.HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(folder_path=directory, repo_id=repo, repo_type="model")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Export a train.py checkpoint to the Hugging Face format.")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("checkpoint", help="a train.py checkpoint, e.g. out/quickstart/ckpt.pt (LoRA adapters are merged)")
    ap.add_argument("out", help="the directory to write")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the weights' dtype (default fp32)")
    ap.add_argument("--push_to", default="", help="then upload it to this Hub repo, USER/NAME (needs HF_TOKEN)")
    args = ap.parse_args()
    try:
        export_hf(args.checkpoint, args.out, args.dtype)
        print(f"exported {args.checkpoint} to {args.out}/: AutoModelForCausalLM.from_pretrained({args.out!r}) loads it")
        if args.push_to:
            print(f"uploaded: {push_to_hub(args.out, args.push_to)}")
    except (ValueError, FileNotFoundError, prepare.DownloadError) as e:
        raise SystemExit(f"model.py: error: {e}") from None
