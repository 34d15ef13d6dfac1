"""
model.py: the GPT in one file, GPT-2 and Llama-style blocks, KV cache and sampling; torch only.

One model with knobs (GPTConfig) that make it GPT-2 (LayerNorm, GELU MLP, learned
positions, biases), Llama (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, no
biases), or any mix of the two:

    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=4096))
    logits, loss = model(idx, targets)                         # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens=100, top_p=0.9)   # KV cache: one prefill, then a token a step

It reads top to bottom: the config, the blocks, the GPT (forward pass, generation), then
what the GPT can use: the chunked loss (memory), LoRA (fine-tuning), the device and dtype.
Attention runs flash.py's Triton kernel on CUDA, torch's scaled_dot_product_attention
elsewhere (the same math). How a model runs, not what it computes, is plain attributes of
the model (attn, loss_chunk, activation_checkpointing), which train.py sets from its
settings. Pretrained weights come in through hf.py, checkpoints through checkpoint.py.
Read next: flash.py, the attention kernel; then train.py.
"""
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    """What the model computes. Checkpoints store it; hf.py maps it to Hugging Face's configs."""
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
    # from the NanoGPT speedrun (off by default: GPT-2 and Llama have none of them)
    qk_norm: bool = False  # RMS-normalize each head's queries and keys: attention logits stay bounded
    logit_softcap: float = 0.0  # the output logits as cap * tanh(logits / cap); 0: off
    zero_init_proj: bool = False  # the projections into the residual stream start at zero: each block starts as identity
    value_embeds: bool = False  # every layer adds a token embedding to its values (layers i and n_layer-1-i share it)
    skips: bool = False  # U-net skips: the second half's blocks also take the first half's outputs, learned-weighted

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        for key, choices in [("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu", "relu2")),
                             ("pos", ("learned", "rope"))]:
            if getattr(self, key) not in choices:
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)!r}: choose one of {choices}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}, "
                             f"and n_kv_head={self.n_kv_head} must divide n_head")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_dim}")
        if not self.logit_softcap >= 0:
            raise ValueError(f"GPTConfig.logit_softcap={self.logit_softcap!r}: 0 (off) or a positive cap")

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

    def forward(self, x, rope, docs, cache, ve, attn):
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
        y = attend(q, k, v, docs, attn)  # (B, T, H, D)
        return self.proj(y.reshape(B, T, H * D))


def attend(q, k, v, docs, attn):
    """Causal attention. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Tk >= Tq (the newest
    Tq keys are the queries' own positions: the diagonal aligns bottom-right). docs:
    None, or (doc_ids, cu_seqlens) to keep packed documents apart. attn: "flash", "sdpa",
    or "auto" (flash on CUDA)."""
    if attn == "flash" or (attn == "auto" and q.is_cuda):
        # imported here, as triton is needed only on this path (and by name, so that a copy
        # of this file that hf.py exports for transformers does not ask for flash.py)
        flash = importlib.import_module("flash")
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

    def forward(self, x, rope, docs, cache, ve, attn):
        x = x + self.attn(self.norm1(x), rope, docs, cache, ve, attn)
        return x + self.mlp(self.norm2(x))

# -----------------------------------------------------------------------------
# The GPT


class GPT(nn.Module):
    # how the model runs, not what it computes: plain attributes that the caller may set
    attn = "auto"  # "flash" (flash.py), "sdpa" (torch), or "auto": flash on CUDA, sdpa elsewhere
    loss_chunk = 0  # tokens at a time through the output head and loss (ChunkedCrossEntropy); 0: all at once
    activation_checkpointing = False  # keep only each block's input, recompute the rest in the backward

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
        loss_chunk, no logits (None): the loss is computed a chunk of tokens at a time."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens, but block_size is {self.cfg.block_size}")
        pos, docs = self.positions(idx, doc_starts, start, cache)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.pos == "rope" else None
        x = self.norm_f(self.run_blocks(x, idx, rope, docs, cache))
        if cache is not None:
            cache.pos += T
        head = self.lm_head.weight if self.lm_head is not None else self.wte.weight  # (Vp, C)
        if targets is not None and self.loss_chunk:  # the logits never exist whole; none are returned
            return None, chunked_loss(x.flatten(0, 1), head, targets.flatten(), self.cfg, self.loss_chunk)
        if targets is None and not all_logits:
            x = x[:, -1:]  # generation needs only the next token's distribution
        logits = output_logits(F.linear(x, head), self.cfg)  # (B, T, Vp)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :self.cfg.vocab_size], loss

    def positions(self, idx, doc_starts, start, cache):
        """Each token's position, (T,) or (B, T), and the documents to keep apart: None, or
        (each token's document number (B, T), cu_seqlens, the packed documents' bounds)."""
        B, T = idx.shape
        if doc_starts is None:
            return torch.arange(start, start + T, device=idx.device), None
        if cache is not None:
            raise ValueError("doc_starts and a KV cache cannot be combined")
        t = torch.arange(T, device=idx.device)
        first = torch.where(doc_starts, t, 0).cummax(dim=1).values  # where each token's document starts
        starts = doc_starts.clone()
        starts[:, 0] = True  # a row starts a document, wherever it was cut
        cu_seqlens = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T).int()
        return t - first, (starts.cumsum(1), cu_seqlens)  # positions restart in every document

    def run_blocks(self, x, idx, rope, docs, cache):
        """The blocks in order, with the speedrun's extras where they are on: each layer's
        value embedding, and the U-net skips from the first half's outputs to the second's."""
        L, outputs = self.cfg.n_layer, []  # the first half's outputs, for the skips
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= L - L // 2:  # the second half: the mirror block's output
                x = x + self.skip_weights[L - 1 - i] * outputs[L - 1 - i]
            ve = self.value_embeds[min(i, L - 1 - i)](idx) if self.value_embeds is not None else None
            if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                # only the block's input is kept for the backward, which runs the block again
                # to get the rest: about a third more compute for a fraction of the memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, docs, None, ve, self.attn, use_reentrant=False)
            else:
                x = block(x, rope, docs, cache, ve, self.attn)
            if self.skip_weights is not None and i < L // 2:  # kept only where a skip will read it
                outputs.append(x)
        return x

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
# The loss, a chunk of tokens at a time


def output_logits(z, cfg):
    """The head's raw output z (..., Vp) as logits: soft-capped if the config says so, and
    the padded rows at -inf (zero probability, in the loss too)."""
    if cfg.logit_softcap:  # smoothly bounded to (-cap, cap)
        z = cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)
    if cfg.padded_vocab > cfg.vocab_size:
        z[..., cfg.vocab_size:] = float("-inf")
    return z


def chunked_loss(x, head, targets, cfg, chunk):
    """The mean cross-entropy of x (N, C) through the head (Vp, C), a chunk of tokens at a
    time: in training by ChunkedCrossEntropy; in evaluation (no gradients) the loss alone,
    with none of the gradient buffers."""
    if torch.is_grad_enabled() and (x.requires_grad or head.requires_grad):
        return ChunkedCrossEntropy.apply(x, head, targets, cfg, chunk)
    return ChunkedCrossEntropy.chunks(x, head, targets, cfg, chunk, grads=False)[0]


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
    def forward(ctx, x, weight, targets, cfg, chunk):
        loss, dx, dw, n = ChunkedCrossEntropy.chunks(x, weight, targets, cfg, chunk, grads=True)
        ctx.save_for_backward(dx, dw, n)
        return loss

    @staticmethod
    def chunks(x, weight, targets, cfg, chunk, grads):
        """(mean loss, dx, dw, target count). x: (N, C) hidden states; weight: (Vp, C), the
        padded vocabulary; targets: (N,), -1 to skip. dx and dw are None without grads."""
        device = x.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype  # autocast's choice
        w = weight.to(dt)
        dx = torch.empty_like(x) if grads else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if grads else None  # accumulated in fp32
        loss = torch.zeros((), device=x.device)
        with torch.autocast(device, enabled=False):  # the dtypes are explicit here
            for i in range(0, len(x), chunk):  # a call a chunk: its (c, Vp) tensors are freed as it returns
                loss += ChunkedCrossEntropy.one_chunk(x[i:i + chunk].to(dt), w, targets[i:i + chunk], cfg,
                                                      dx[i:i + chunk] if grads else None, dw)
        n = (targets >= 0).sum()  # the loss is the mean over the tokens that have targets
        return loss / n, dx, dw, n

    @staticmethod
    def one_chunk(x, w, t, cfg, dx=None, dw=None):
        """The summed loss of c tokens, x: (c, C), t: (c,); with dx (c, C) given, their
        gradients go into dx and are added into dw (Vp, C)."""
        keep = (t >= 0).unsqueeze(1)  # (c, 1): this token has a target
        t = t.clamp(min=0).unsqueeze(1)  # (c, 1); skipped tokens count 0 below
        z = (x @ w.T).float()  # (c, Vp): with logp, the only vocabulary-sized tensors (3 when soft-capped)
        logits = output_logits(z, cfg)  # z itself, unless soft-capped
        logp = torch.log_softmax(logits, dim=1)
        loss = -(logp.gather(1, t) * keep).sum()
        if dx is None:
            return loss
        g = logp.exp_()  # the softmax, in place
        g.scatter_add_(1, t, -torch.ones_like(t, dtype=g.dtype))  # minus onehot: d loss / d logits
        if cfg.logit_softcap:  # through the cap: d logits / d z = 1 - tanh(z / cap)^2
            g *= 1 - torch.tanh(z / cfg.logit_softcap).square()
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
LORA_VARIANTS = ("lora", "rslora", "dora")


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
    if variant not in LORA_VARIANTS:
        raise ValueError(f"lora_variant={variant!r}: choose {', '.join(LORA_VARIANTS)}")
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


def grow_vocab(model, vocab_size):
    """The model with vocab_size tokens: the new ids (special tokens added to its tokenizer,
    such as a chat's <|im_start|>) get rows of the token tables, each the mean of the old
    rows, so that they start as an average token rather than noise that swamps the logits
    (as transformers' resize_token_embeddings does). The old ids keep their rows."""
    cfg, old = model.cfg, model.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size}: the model has {old} tokens already, and does not shrink")
    cfg.vocab_size = vocab_size  # (padded_vocab follows)
    with torch.no_grad():
        for table in [model.wte, model.lm_head, *(model.value_embeds or [])]:
            if table is None or vocab_size == old:
                continue
            w = table.weight  # (old padded vocab, C)
            grown = torch.empty(max(cfg.padded_vocab, w.shape[0]), w.shape[1], dtype=w.dtype, device=w.device)
            grown[:old] = w[:old]
            grown[old:] = w[:old].mean(0)  # the new rows, and the padding (never an output: masked to -inf)
            table.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
            if isinstance(table, nn.Embedding):
                table.num_embeddings = len(grown)
            else:
                table.out_features = len(grown)
    return model

# -----------------------------------------------------------------------------
# Where it runs: the device and the dtype (train.py, sample.py and the rest choose here)

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


if __name__ == "__main__":  # `python model.py export` was the export's command before
    raise SystemExit("model.py is not a script: the export is `python checkpoint.py export CKPT DIR`")
