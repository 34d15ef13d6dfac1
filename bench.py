"""
bench.py: every benchmark of the project, printed as markdown tables.

    python bench.py              # every section
    python bench.py tokenizer    # just one
    python bench.py --tiny       # every section at toy sizes, in seconds: that it runs (the tests do this)
    python bench.py gpu --out=DIR    # the GPU pass: CUDA tests, attention, training, sampling; a report in DIR
    python bench.py plot out/a out/b     # their loss, val bpb and evals against the tokens seen, as a PNG
    python bench.py sweep --learning_rate=1e-3,3e-3 --seeds=2   # a grid of runs, a table and plots

Each section times our code and a reference in the same run, on the same machine,
and prints the ratio. Numbers go into README.md with the date, device and versions.
Read the code it measures first: everything else, in the README's reading order.
"""
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

import bpe
import prepare


# what --tiny trains instead of the quickstart's model and batch: a few seconds a run
TINY_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch=2",
              "--total_batch_size=128", "--eval_tokens=256", "--value_embeds=False"]


def best_of(*fns, repeat=3):
    """The fastest of `repeat` runs of each function, in seconds: the least disturbed by
    other work. The runs of several functions alternate, so that a slow spell of the
    machine (a shared VM has them) falls on all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    best = [min(ts) for ts in times]
    return best if len(fns) > 1 else best[0]


def note(*msg):
    """Progress to stderr, so that a long section does not sit silent; the tables go to stdout."""
    print("bench:", *msg, file=sys.stderr, flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {os.cpu_count()} cores"
    except (OSError, IndexError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def header(title, versions):
    print(f"\n### {title}\n")
    print(f"{datetime.date.today()}, {cpu_name()}, Python {platform.python_version()}, " +
          ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")


# -----------------------------------------------------------------------------
# tokenizer: training time against Hugging Face tokenizers, encoding speed against tiktoken


def bench_tokenizer(tiny=False):
    import regex
    import tiktoken
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    versions = {"regex": regex.__version__, "tiktoken": tiktoken.__version__,
                "tokenizers": tokenizers.__version__ if tokenizers else "not installed"}
    vocab_sizes = (300,) if tiny else (8192, 32768)
    docs = list(prepare.stdlib_docs("train"))[:20 if tiny else None]
    text = bpe.EOT.join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "corpus.txt"
        path.write_text(text, encoding="utf-8")

        header(f"Tokenizer training: {mb:.1f} MB of Python standard library source ({len(docs)} files)", versions)
        print("| vocab size | bpe.py train | HF tokenizers BpeTrainer | speedup (HF time / ours) |")
        print("|---:|---:|---:|---:|")
        trained = {}
        for size in vocab_sizes:
            ours = lambda: trained.__setitem__(size, bpe.train([], size, files=[path]))  # noqa: E731
            t_ours, t_hf = best_of(ours, lambda: hf_train(tokenizers, path, size), repeat=2) if tokenizers \
                else (best_of(ours, repeat=2), None)
            hf = f"{t_hf:.2f} s" if t_hf else "n/a"
            ratio = f"**{t_hf / t_ours:.2f}x**" if t_hf else "n/a"
            print(f"| {size} | {t_ours:.2f} s | {hf} | {ratio} |")

    # encoding: one core, the last 4 MB of the corpus
    sample = text[-(20_000 if tiny else 4_000_000):]
    mb = len(sample.encode("utf-8")) / 1e6
    ours = trained[vocab_sizes[0]]
    rows = [(f"bpe.py pure Python, ours ({ours.n_vocab} tokens)", cold(ours)),
            (f"bpe.py to_tiktoken(), ours ({ours.n_vocab} tokens)", ours.to_tiktoken().encode_ordinary)]
    try:
        gpt2 = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without tiktoken's cached files
        print(f"\n(tiktoken's gpt2 is unavailable: {type(e).__name__}; its rows are skipped)")
        gpt2 = None
    if gpt2 is not None:
        ranks = {gpt2.decode_single_token_bytes(i): i for i in range(gpt2.n_vocab) if i != gpt2.eot_token}
        ours_gpt2 = bpe.Tokenizer(ranks, [], {bpe.EOT: gpt2.eot_token})  # no merges: the ranks order them
        rows += [("bpe.py pure Python, GPT-2's ranks", cold(ours_gpt2)),
                 ("bpe.py to_tiktoken(), GPT-2's ranks", ours_gpt2.to_tiktoken().encode_ordinary),
                 ("tiktoken gpt2 (reference)", gpt2.encode_ordinary)]
    header(f"Tokenizer encoding: {mb:.1f} MB, one core, encode_ordinary", versions)
    print("| encoder | MB/s | vs tiktoken gpt2 |")
    print("|---|---:|---:|")
    # each encoder's runs back to back: interleaved, the others evict its caches
    speeds = [(name, mb / best_of(lambda: fn(sample))) for name, fn in rows]
    ref = speeds[-1][1] if gpt2 is not None else None
    for name, speed in speeds:
        print(f"| {name} | {speed:.2f} | {f'{speed / ref:.2f}x' if ref else 'n/a'} |")
    bench_streaming(ours, versions, 20_000 if tiny else 1_000_000)


def chinese_lines(n_bytes, seed=0):
    """Chinese-like text: words of 1 to 4 random CJK characters, 3,000 of them with Zipf
    frequencies, in clauses that end in punctuation, one sentence a line. No letter is
    followed by a space, the place to cut that streaming once needed (issue 14)."""
    import random
    rng = random.Random(seed)
    words = ["".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (k + 1) for k in range(len(words))]
    lines, n = [], 0
    while n < n_bytes:
        clauses = ("".join(rng.choices(words, weights, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 3)))
        lines.append("，".join(clauses) + rng.choice("。！？") + "\n")
        n += len(lines[-1].encode("utf-8"))
    return lines


def bench_streaming(tok, versions, n_bytes):
    """encode_iterable over the lines of n_bytes (1 MB) of Chinese text against encode() on all of it."""
    import tracemalloc
    lines = chinese_lines(n_bytes)
    text = "".join(lines)
    encode, stream = cold(tok, tok.encode), cold(tok, lambda lines: list(tok.encode_iterable(lines)))
    assert stream(lines) == encode(text), "encode_iterable and encode differ"
    t_encode, t_stream = best_of(lambda: encode(text), lambda: stream(lines))
    peaks = []
    for run in (lambda: encode(text), lambda: sum(1 for _ in cold(tok, tok.encode_iterable)(lines))):
        tracemalloc.start()
        run()  # the streamed ids are counted, not kept
        peaks.append(tracemalloc.get_traced_memory()[1] / 1e6)
        tracemalloc.stop()
    header(f"Tokenizer streaming: {len(text.encode('utf-8')) / 1e6:.1f} MB of Chinese text, {len(lines)} lines, "
           f"pure Python, ours ({tok.n_vocab} tokens)", versions)
    print("| call | time | vs encode() | peak memory beyond the text (the word cache included) |")
    print("|---|---:|---:|---:|")
    print(f"| encode(text) | {t_encode:.2f} s | 1.00x | {peaks[0]:.1f} MB |")
    print(f"| encode_iterable(lines) | {t_stream:.2f} s | {t_stream / t_encode:.2f}x | {peaks[1]:.1f} MB |")


def hf_train(tokenizers, path, size):
    """Hugging Face's byte-level BPE trained like ours: GPT-2 split, all 256 bytes, one special."""
    from tokenizers import models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[bpe.EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(path)], trainer)
    assert tok.get_vocab_size() == size
    return tok


def cold(tok, fn=None):
    """fn (by default tok.encode_ordinary) with tok's cache emptied first, so each run is timed cold."""
    def encode(text):
        tok.clear_cache()
        return (fn or tok.encode_ordinary)(text)
    return encode


# -----------------------------------------------------------------------------
# prepare: tokenizing documents into shards over all cores, against one tiktoken process


def bench_prepare(tiny=False):
    import tiktoken
    docs = list(prepare.stdlib_docs("train"))[:20 if tiny else None]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec, enc = "gpt2", tiktoken.get_encoding("gpt2")
        except Exception:  # offline without tiktoken's cached gpt2 files: our own BPE
            bpe.train(docs, 300 if tiny else 4096).save(os.path.join(tmp, "tok.bpe"))
            spec, enc = "tok.bpe", bpe.load_tokenizer("tok.bpe", tmp)
        dtype = prepare.token_dtype(enc.n_vocab)
        # decontamination against the stdlib's own val split, as `python prepare.py` does
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            index_path, _ = prepare.build_eval_index(enc, tmp)
        t_index = time.perf_counter() - t0
        note(f"prepare: tokenizing {mb:.1f} MB: one tiktoken process, ours, ours with decontamination; "
             "alternating, best of 3")

        def ours(decon=None):
            with contextlib.redirect_stdout(io.StringIO()):
                prepare.tokenize_split(docs, "train", tmp, spec, enc.eot_token, dtype, os.cpu_count(), decon)

        def reference():  # the same work in one process: encode, then one array
            ids = []
            for doc in docs:
                ids.append(enc.eot_token)
                ids += enc.encode_ordinary(doc)
            np.array(ids, dtype=dtype).tofile(os.path.join(tmp, "ref.bin"))

        decon = (index_path, prepare.ngram, prepare.overlap)
        t_ref, t_ours, t_decon = best_of(reference, ours, lambda: ours(decon))
    header(f"Tokenizing into shards: {mb:.1f} MB of stdlib source, tokenizer {spec}",
           {"tiktoken": tiktoken.__version__, "numpy": np.__version__})
    print("| pipeline | MB/s | time | speedup |")
    print("|---|---:|---:|---:|")
    print(f"| tiktoken, one process (reference) | {mb / t_ref:.1f} | {t_ref:.1f} s | 1.00x |")
    print(f"| prepare.py, {os.cpu_count()} processes, writing shards | {mb / t_ours:.1f} | {t_ours:.1f} s | "
          f"**{t_ref / t_ours:.2f}x** |")
    print(f"| the same, decontaminated against the val split ({prepare.ngram}-grams) | {mb / t_decon:.1f} | "
          f"{t_decon:.1f} s | **{t_ref / t_decon:.2f}x** |")
    print(f"\nDecontamination cost: {t_decon - t_ours:.1f} s for the check over {os.cpu_count()} processes, "
          f"{t_index:.2f} s to index the val split's n-grams.")


# -----------------------------------------------------------------------------
# model: a training step (forward + backward) of model.py against a plain nanoGPT-style model


class Baseline(torch.nn.Module):
    """The reference: a GPT-2 written the plain nanoGPT way, eager PyTorch."""

    def __init__(self, vocab, block, n_layer, n_head, d):
        super().__init__()
        nn = torch.nn
        self.n_head, self.wte, self.wpe = n_head, nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
            ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for L in self.layers:
            q, k, v = L.qkv(L.ln1(x)).view(B, T, 3, self.n_head, -1).transpose(1, 3).unbind(2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + L.proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + L.out(F.gelu(L.fc(L.ln2(x)), approximate="tanh"))
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def quickstart(**overrides):
    """GPTConfig of the quickstart model (train.py's defaults), and its name for a table."""
    import train
    cfg = dataclasses.replace(train.model_config(4096), **overrides)
    return cfg, f"{cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.pos} positions, vocab {cfg.vocab_size}"


def bench_model(tiny=False):
    import model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, name = quickstart(pos="learned", value_embeds=False)  # GPT-2 blocks, as the baseline's
    shapes = [(f"quickstart shapes, GPT-2 blocks: {name}", cfg, 16 * 512 // cfg.block_size),
              ("GPT-2 124M: 12 layers, 768 wide, vocab 50257", model.GPTConfig(
                  vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), 1 if device == "cpu" else 8)]
    if tiny:
        shapes = [("tiny: 1 layer, 32 wide, vocab 300", model.GPTConfig(vocab_size=300, block_size=32, n_layer=1,
                                                                       n_head=2, n_embd=32), 2)]
    header(f"Model training step (forward + backward), {device}, fp32", {"torch": torch.__version__})
    print("| model | batch x seq | model.py | nanoGPT-style eager | speedup |")
    print("|---|---|---:|---:|---:|")
    for name, cfg, batch in shapes:
        note(f"model: {name}, {batch} x {cfg.block_size}, alternating, best of 3")
        torch.manual_seed(0)
        ours = model.GPT(cfg).to(device)
        base = Baseline(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device)
        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)

        def step(m, loss_of):
            loss_of(m).backward()
            m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        ours_fn = lambda: step(ours, lambda m: m(idx, idx)[1])  # noqa: E731
        base_fn = lambda: step(base, lambda m: m(idx, idx))  # noqa: E731
        ours_fn(), base_fn()  # warm up
        t_ours, t_base = best_of(ours_fn, base_fn)
        print(f"| {name} | {batch} x {cfg.block_size} | {t_ours * 1e3:.0f} ms | {t_base * 1e3:.0f} ms | "
              f"**{t_base / t_ours:.2f}x** |")


# -----------------------------------------------------------------------------
# attention: flash.py against SDPA's FlashAttention-2 backend and naive PyTorch (CUDA only)


def bench_attention(tiny=False):
    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        print("\n### Attention\n\nneeds a CUDA GPU: skipped")
        return
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import flash  # on a CPU (--tiny), through triton's interpreter, which test_all.py and bench --tiny set
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # the interpreter's bf16 dot is wrong

    def naive(q, k, v, causal):  # (B, H, N, D): the whole score matrix in memory
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    impls = {"flash.py": lambda q, k, v, c: flash.flash_attn(q, k, v, causal=c),  # (B, N, H, D)
             "SDPA flash": lambda q, k, v, c: sdpa(*(x.transpose(1, 2) for x in (q, k, v)), c).transpose(1, 2),
             "naive": lambda q, k, v, c: naive(*(x.transpose(1, 2) for x in (q, k, v)), c).transpose(1, 2)}

    def ms(fn):  # triton's CUDA-event timing; on a CPU the best of 2 runs
        return triton.testing.do_bench(fn) if cuda else best_of(fn, repeat=2) * 1e3

    def measure(fn, q, k, v, causal):
        """ms for forward, backward, forward + backward, and the peak memory of a step in MB."""
        do = torch.randn_like(q)
        fwd = ms(lambda: fn(q, k, v, causal))
        o = fn(q, k, v, causal)
        bwd = ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        both = ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
        o = None  # free it before measuring the peak
        if not cuda:
            return fwd, bwd, both, 0.0
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
        return fwd, bwd, both, (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    tokens, heads_dims, lengths = (128, (32,), (64,)) if tiny else (16384, (64, 128), (512, 1024, 2048, 4096, 8192, 16384))
    header(f"Attention, {str(dtype)[6:]}, {torch.cuda.get_device_name() if cuda else cpu_name()}: TFLOP/s (forward "
           "4·B·H·N²·d, halved when causal; backward 2.5x that)", {"torch": torch.__version__, "triton": triton.__version__})
    print("| N | d | causal | flash.py fwd / bwd / both | SDPA fwd / bwd / both | naive both | both vs SDPA | "
          "peak MB flash.py / SDPA |")
    print("|---:|---:|---|---|---|---:|---:|---|")
    for d in heads_dims:
        for causal in (True, False):
            for n in lengths:
                B, H = max(1, tokens // n), (2048 if not tiny else 64) // d  # 16k tokens of a 2048-wide model
                q, k, v = (torch.randn(B, n, H, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
                flops = 4 * B * H * n * n * d / (2 if causal else 1)
                res = {name: measure(fn, q, k, v, causal) for name, fn in impls.items()
                       if name != "naive" or n <= 4096}
                tf = {name: [f / t * 1e-9 for f, t in zip((flops, 2.5 * flops, 3.5 * flops), r[:3])]
                      for name, r in res.items()}
                fmt = lambda xs: " / ".join(f"{x:.3g}" for x in xs)  # noqa: E731
                naive_both = f"{tf['naive'][2]:.3g}" if "naive" in tf else "n/a"
                print(f"| {n} | {d} | {causal} | {fmt(tf['flash.py'])} | {fmt(tf['SDPA flash'])} | {naive_both} | "
                      f"**{res['SDPA flash'][2] / res['flash.py'][2]:.2f}x** | "
                      f"{res['flash.py'][3]:.0f} / {res['SDPA flash'][3]:.0f} |")
    if tiny:
        return
    q, k, v = (torch.randn(1, 16384, 16, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    both = {name: measure(impls[name], q, k, v, True)[2] for name in ("flash.py", "SDPA flash")}
    print(f"\nB=1, H=16, N=16384, d=64, causal, bf16, forward + backward: flash.py {both['flash.py']:.2f} ms, "
          f"SDPA flash {both['SDPA flash']:.2f} ms")


# -----------------------------------------------------------------------------
# kernels: what flash.py's kernels cost on an H100 and an A100, compiled ahead of time on CPU


def bench_kernels():
    import triton
    import flash
    try:
        triton.knobs.nvidia.ptxas.path, triton.knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        print(f"\n### Kernels\n\nneeds the ptxas and cuobjdump that triton's wheel ships ({e}): skipped")
        return
    rows = flash.report()
    header("flash.py's kernels compiled for sm_90 (H100) and sm_80 (A100): every autotune candidate that either GPU "
           "keeps, bf16 (`python bench.py kernels`)", {"triton": triton.__version__})
    print("Registers per thread (causal, not causal), bytes spilled, shared memory, and whether the binary uses wgmma "
          "and cp.async. Each GPU keeps its own list (flash.CANDIDATES); a tile it does not keep is built for it too, "
          "to show what it would cost there, and marked (not kept).\n")
    print("| kernel | d | BLOCK_M x BLOCK_N, warps, stages | sm_90 registers | spill | shared KB | wgmma | cp.async | "
          "sm_80 registers | spill | shared KB | wgmma | cp.async |")
    print("|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|---|---|")
    builds = {}  # (kernel, head dim, candidate) -> arch -> its causal build, then the non-causal one
    for r in rows:
        builds.setdefault((r["kernel"], r["head_dim"], tuple(r["candidate"])), {}).setdefault(r["arch"], []).append(r)

    def cells(rs):
        uses = ["yes" if all(r[key] for r in rs) else "no" for key in ("wgmma", "cp_async")]
        registers = ", ".join(str(r["registers"]) for r in rs)
        return [registers if rs[0]["kept"] else f"({registers}) not kept", str(max(r["spill"] for r in rs)),
                f"{max(r['shared'] for r in rs) / 1024:.0f}", *uses]

    for (kernel, d, (m, n, warps, stages)), by_arch in builds.items():
        print("| " + " | ".join([kernel, str(d), f"{m} x {n}, {warps}, {stages}", *cells(by_arch[90]),
                                 *cells(by_arch[80])]) + " |")


# -----------------------------------------------------------------------------
# train: whole training steps of train.py (data, accumulation, optimizer, logging)
# against a plain eager PyTorch loop over the same model


def bench_train(tiny=False, data_dir="data", config=None):
    import checkpoint
    import model
    args = ([config] if config else []) + (TINY_TRAIN if tiny else []) + [f"--data_dir={data_dir}"]
    steps = 12 if tiny else 30
    note(f"train: {steps} steps of train.py {config or '(the quickstart)'}, then a plain loop")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", *args, f"--max_steps={steps}", "--eval_interval=100000",
               "--log_interval=10", f"--out_dir={tmp}", "--warmup_steps=1", "--optimizer=adamw"]  # as the loop
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"\n### Training\n\ntrain.py failed (is the data prepared?): {run.stderr.strip()[-300:]}")
            return
        logs = [json.loads(line) for line in open(os.path.join(tmp, "log.jsonl")) if '"loss"' in line]
        ours = [r for r in logs if r["step"] > 10]  # after the first steps (warm-up, compilation)
        tps = sum(r["tokens_per_s"] for r in ours) / len(ours)
        mfu = ours[-1]["mfu"]
        # the baseline: the same model and batch (as the run's checkpoint says), a bare loop
        # (no accumulation bookkeeping, no logging)
        ckpt = checkpoint.load_checkpoint(os.path.join(tmp, "ckpt.pt"))
    s, cfg = ckpt["settings"], model.GPTConfig(**ckpt["model_config"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = model.GPT(cfg).to(device)
    m.attn, m.loss_chunk = "sdpa", s["loss_chunk"]  # torch's attention, the run's loss
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (s["micro_batch"], s["block_size"]), device=device)
    accum = s["total_batch_size"] // (s["micro_batch"] * s["block_size"])

    def step():
        for _ in range(accum):
            m(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
    step()
    t0 = time.perf_counter()
    for _ in range(10):  # a mean, as train.py's log reports
        step()
    base_tps = s["total_batch_size"] * 10 / (time.perf_counter() - t0)
    header(f"Training steps: {config or 'the quickstart'}, {device}", {"torch": torch.__version__})
    print("| loop | tokens/s | MFU | vs plain loop |")
    print("|---|---:|---:|---:|")
    print(f"| plain eager PyTorch loop, same model (reference) | {base_tps:,.0f} | | 1.00x |")
    print(f"| train.py (steps 11-{steps}) | {tps:,.0f} | {f'{mfu:.1%}' if mfu else 'n/a'} | **{tps / base_tps:.2f}x** |")
    if not config:
        bench_optimizers(2 if tiny else 120, args)


def bench_optimizers(budget, args):
    """AdamW against Muon on the quickstart at equal time: each first runs 20 steps to
    measure its own step time, then as many steps as fit in `budget` seconds of training
    (the schedule fit to them). Evaluation and start-up come on top, alike for both."""
    rows = []
    for name in ("adamw", "muon"):
        with tempfile.TemporaryDirectory() as tmp:
            logs = quickstart_run(tmp, *args, f"--optimizer={name}", "--max_steps=20", "--eval_tokens=256")
            step_ms = np.mean([r["step_ms"] for r in logs if "step_ms" in r and r["step"] > 10])
        steps = max(1, int(budget * 1000 / step_ms))
        note(f"train: {steps} quickstart steps with {name} ({step_ms:.0f} ms a step)")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            logs = quickstart_run(tmp, *args, f"--optimizer={name}", f"--max_steps={steps}", f"--eval_interval={steps}")
            wall = time.perf_counter() - t0
        tps = np.mean([r["tokens_per_s"] for r in logs if "tokens_per_s" in r and r["step"] > min(10, steps - 1)])
        rows.append((name, steps, tps, wall, [r["val_bpb"] for r in logs if "val_bpb" in r][-1]))
    header(f"AdamW against Muon: {budget} s of quickstart training each (the schedule fit to the steps)",
           {"torch": torch.__version__})
    print("| optimizer | steps | tokens/s | wall time (train.py, start to end) | val bits per byte |")
    print("|---|---:|---:|---:|---:|")
    for name, steps, tps, wall, bpb in rows:
        print(f"| {name} | {steps} | {tps:,.0f} | {wall:.0f} s | {bpb:.4f} |")


def quickstart_run(out_dir, *args):
    """train.py's quickstart with these settings, to the end; the rows of its log.jsonl."""
    log = os.path.join(out_dir, "train.log")
    code, _ = run_script(["train.py", *args, "--log_interval=10", f"--out_dir={out_dir}"], log)
    assert code == 0, open(log).read()[-2000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


# -----------------------------------------------------------------------------
# memory: a training step's peak memory and time with the plain loss, the chunked loss
# (loss_chunk), and the chunked loss with activation checkpointing


def memory_variants(chunk):
    """How the model runs in each variant: its attributes loss_chunk and activation_checkpointing."""
    return {"plain": dict(loss_chunk=0, activation_checkpointing=False),
            f"chunked loss, {chunk} tokens a chunk": dict(loss_chunk=chunk, activation_checkpointing=False),
            "chunked loss + activation checkpointing": dict(loss_chunk=chunk, activation_checkpointing=True)}


def training_step(cfg, batch, device, options):
    """A model of cfg (a dict of GPTConfig fields), run with `options` (memory_variants),
    and a function that runs one training step of it: forward and backward, with bf16
    autocast on CUDA as train.py."""
    import model
    torch.manual_seed(0)
    m = model.GPT(model.GPTConfig(**cfg)).to(device)
    for key, value in options.items():
        setattr(m, key, value)
    idx = torch.randint(0, m.cfg.vocab_size, (batch, m.cfg.block_size), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = m(idx, idx)[1]
        loss.backward()
        m.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return m, step


def peak_mb(fn, device):
    """The peak memory of fn() in MB above what was in use before it: the CUDA allocator's
    count, or on a CPU the process's resident memory (Linux's VmHWM, its high-water mark,
    restarted through /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    def kb(key):
        return int(re.search(rf"{key}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text())[1])
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    base = kb("VmRSS")
    fn()
    return (kb("VmHWM") - base) / 1024


def memory_peak(cfg, options, batch, keep_freed):
    """One training step's peak memory in MB. Run in a fresh process: one whose allocator
    already holds freed memory would reuse it and show a lower peak."""
    import train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if keep_freed and device == "cpu":
        train.keep_freed_memory()
    return peak_mb(training_step(cfg, batch, device, options)[1], device)


def memory_times(cfg, batch, variants, repeat):
    """Seconds of a training step in each variant (the model's attributes to set),
    alternating, best of `repeat`, after one step each to warm up. Run in its own process,
    with train.py's keep_freed_memory on a CPU, which must not change the other sections."""
    import train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        train.keep_freed_memory()
    m, step = training_step(cfg, batch, device, {})

    def run(variant):
        def fn():
            for key, value in variant.items():
                setattr(m, key, value)
            step()
        return fn
    fns = [run(v) for v in variants]
    for fn in fns:
        fn()
    return best_of(*fns, repeat=repeat)


def in_fresh_process(fn, *args):
    """fn(*args), a function of this file with JSON arguments and result, in a new process."""
    code = f"import json, sys, bench; print(json.dumps(bench.{fn.__name__}(*json.loads(sys.argv[1]))))"
    run = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parent)
    if run.returncode:
        raise RuntimeError(f"{fn.__name__} failed: {run.stderr.strip()[-1000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def bench_memory(tiny=False):
    import model
    import train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qs, name = quickstart()
    gpt2 = model.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    shapes = [(f"the quickstart: {name}", qs, train.micro_batch, 3),
              ("GPT-2 124M: 12 layers, 768 wide, vocab 50257", gpt2, 8, 2)]
    chunk, fresh = 1024, in_fresh_process
    if tiny:  # in this process: the peaks then count what earlier steps left in the heap
        chunk, fresh = 16, lambda fn, *args: fn(*args)
        shapes = [("tiny: 1 layer, 32 wide", model.GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2,
                                                              n_embd=32), 2, 1)]
    rows = []
    for name, cfg, batch, repeat in shapes:
        variants = memory_variants(chunk)
        note(f"memory: {name}, {batch} x {cfg.block_size}: step times, alternating, best of {repeat}")
        times = fresh(memory_times, dataclasses.asdict(cfg), batch, list(variants.values()), repeat)
        for (label, variant), t in zip(variants.items(), times):
            run = dataclasses.asdict(cfg)
            note(f"memory: {name}, {label}: peaks, each in a fresh process")
            # the loss alone: the model without blocks (embedding, final norm, head, loss)
            loss = [fresh(memory_peak, dict(run, n_layer=0), variant, batch, keep) for keep in (True, False)]
            step = [fresh(memory_peak, run, variant, batch, keep) for keep in (True, False)]
            rows.append((name, f"{batch} x {cfg.block_size}", label, loss, step, t, times[0]))
    header(f"Training memory: the loss and a training step (forward + backward), {device}, "
           f"{'bf16 autocast' if device == 'cuda' else 'fp32'}", {"torch": torch.__version__})
    print("| model | batch x seq | variant | loss peak MB | step peak MB | step time | vs plain |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, shape, label, loss, step, t, plain in rows:
        mb = lambda pair: " / ".join(f"{x:,.0f}" for x in pair)  # noqa: E731
        print(f"| {name} | {shape} | {label} | {mb(loss)} | {mb(step)} | {t * 1e3:,.0f} ms | **{plain / t:.2f}x** |")


# -----------------------------------------------------------------------------
# sample: generation with the KV cache against recomputing the whole context every step


def bench_sample(tiny=False, gpt2=False, batches=(1,)):
    """Tokens/s of generation with the KV cache against recomputing the whole context every
    step, for the quickstart's model (gpt2=False) or GPT-2 124M's shapes, at each batch size."""
    import model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    new_tokens = 16 if tiny else 128 if gpt2 else 512
    if tiny:
        cfg = model.GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)
        name = "tiny: 1 layer, 32 wide"
    elif gpt2:
        cfg, name = model.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), "GPT-2 124M"
    else:
        cfg, name = quickstart()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    header(f"Sampling {new_tokens} new tokens, {device}, {str(dtype)[6:]}: {name}, block {cfg.block_size}",
           {"torch": torch.__version__})
    print("| batch | KV cache | no cache (nanoGPT-style) | speedup |")
    print("|---:|---:|---:|---:|")
    torch.manual_seed(0)
    m = model.GPT(cfg).to(device, dtype).eval()
    for batch in batches:
        note(f"sample: {name}, batch {batch}, {new_tokens} tokens with and without the cache, alternating")
        idx = torch.zeros(batch, 1, dtype=torch.long, device=device)

        def no_cache():  # the whole (cropped) context again at every step
            seq = idx
            with torch.no_grad():
                for _ in range(new_tokens):
                    logits, _ = m(seq[:, -cfg.block_size:])
                    seq = torch.cat([seq, model.sample(logits[:, -1].float(), 1.0)[:, None]], dim=1)
            return seq

        def sync(fn):
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        t_cache, t_plain = best_of(lambda: sync(lambda: m.generate(idx, new_tokens)), lambda: sync(no_cache),
                                   repeat=1 if tiny else 2 if gpt2 else 4)
        n = batch * new_tokens
        print(f"| {batch} | {n / t_cache:,.0f} tok/s | {n / t_plain:,.0f} tok/s | **{t_plain / t_cache:.1f}x** |")


# -----------------------------------------------------------------------------
# gpu: the GPU pass in one command, `python bench.py gpu --out=DIR`: the CUDA tests, then
# attention, GPT-2 124M's training steps and sampling, a report written section by section


class Tee(io.TextIOBase):
    """A stream that writes to several: the screen, and a section's text for the report."""

    def __init__(self, *streams):
        super().__init__()
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def bench_gpu(tiny=False, out="gpu_report"):
    """Runs the GPU pass's sections in order, each printed as it finishes and added to
    out/report.md with its time, its raw text in out/<section>.md: a run cut short keeps what
    it measured, and a section that fails records its error (out/<section>.error.txt) and
    the next one runs. Planned for about 8 minutes on an H100 (the times per section are in
    the report, to plan the next run by): the CUDA tests ~1.5 (mostly compiling kernels),
    attention ~2.5, training ~3 (four models compiled), sampling ~0.5."""
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "report.md")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"no GPU: {cpu_name()} (a dry run)"
    with open(report, "w") as f:
        f.write(f"# The GPU pass, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n{device}, Python "
                f"{platform.python_version()}, torch {torch.__version__}; `python bench.py gpu"
                f"{' --tiny' if tiny else ''}`\n")
    for name, fn in [("tests", gpu_tests), ("attention", bench_attention), ("training", gpu_training),
                     ("sampling", lambda tiny: bench_sample(tiny, gpt2=True, batches=(1, 16)))]:
        note(f"gpu: {name}")
        text, t0, status = io.StringIO(), time.time(), "done"
        try:
            with contextlib.redirect_stdout(Tee(sys.stdout, text)):
                fn(tiny=tiny, **({"out": out} if name == "tests" else {}))
        except Exception:
            status = "FAILED"
            error = traceback.format_exc()
            print(error, file=sys.stderr)
            with open(os.path.join(out, f"{name}.error.txt"), "w") as f:
                f.write(error)
            text.write(f"\n```\n{error[-3000:]}```\n")
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(text.getvalue())
        with open(report, "a") as f:
            f.write(f"\n## {name}: {status} in {time.time() - t0:.0f} s\n{text.getvalue()}")
    print(f"\nbench: the report is {report}")


def gpu_tests(tiny=False, out="."):
    """The tests that need CUDA (test_all.py's, named *cuda*: flash.py at large sizes in
    bf16 and fp16, the model's bf16 logits, torch.compile over flash.py), their log in out/."""
    log = os.path.join(out, "tests.log")
    code, _ = run_script(["-m", "pytest", "-q", "-rs", "--tb=short", "-k", "cuda", "-p", "no:cacheprovider",
                          "test_all.py"], log)
    lines = open(log).read().splitlines()
    header("The CUDA tests (`pytest -k cuda test_all.py`)", {"torch": torch.__version__})
    print("```\n" + "\n".join([line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))][:30] +
                                lines[-1:]) + "\n```")
    if code not in (0, 5):  # 5: none collected
        raise RuntimeError(f"the CUDA tests failed (exit code {code}): see {log}")


def gpu_training(tiny=False):
    """GPT-2 124M's training steps with synthetic tokens: train.py's train_step (its
    accumulation, clipping and update) on the compiled model, bf16 autocast, 16 x 1024
    tokens a step, AdamW; flash.py against SDPA, documents kept apart (doc_mask, a document
    every 512 tokens on average) or not. Tokens/s and MFU over 10 steps, after 3 to compile
    and warm up."""
    import model
    import train
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = model.GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32) if tiny else \
        model.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    batch, steps, eot = (2, 2, 0) if tiny else (16, 10, 50256)

    class Tokens:  # random tokens, an end-of-text among them every 512 on average
        def next(self):
            x = torch.randint(1, cfg.vocab_size, (batch, cfg.block_size + 1))
            x[torch.rand(x.shape) < 1 / 512] = eot
            return x[:, :-1], x[:, 1:]

    header(f"Training steps, {dev}, {'bf16' if cuda else 'fp32'}: {cfg.n_layer} layers, {cfg.n_embd} wide, "
           f"vocab {cfg.vocab_size}, {batch} x {cfg.block_size} tokens a step", {"torch": torch.__version__})
    print("| attention | documents kept apart | tokens/s | MFU | compile + warm-up | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    peak = train.peak_flops(dev)
    for attn in ("flash", "sdpa"):
        for doc_mask in (False, True):
            note(f"gpu: training, attention {attn}, doc_mask {doc_mask}")
            torch.manual_seed(0)
            m = model.GPT(cfg).to(dev)
            m.attn, m.loss_chunk = attn, 1024
            fast = torch.compile(m) if cuda else m
            opt = torch.optim.AdamW(m.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
            scaler, data = torch.amp.GradScaler(dev.type, enabled=False), Tokens()

            def step():
                train.train_step(fast, m, opt, scaler, data, 1, autocast, dev, eot if doc_mask else None)
                if cuda:
                    torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(1 if tiny else 3):
                step()
            warm = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            tps = batch * cfg.block_size * steps / (time.perf_counter() - t0)
            mfu = m.flops_per_token(cfg.block_size) * tps / peak if peak else None
            memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB" if cuda else "n/a"
            print(f"| {attn} | {'yes' if doc_mask else 'no'} | {tps:,.0f} | {f'{mfu:.1%}' if mfu else 'n/a'} | "
                  f"{warm:.0f} s | {memory} |")
            m = fast = opt = None  # freed before the next model
            if cuda:
                torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# lora: does LoRA learn less and forget less? (Biderman et al. 2024), offline on the stdlib


GUI = ("tkinter", "idlelib", "turtle", "ttk", "idle_test")  # the new domain: Tk GUI code, held out of pretraining


def lora_domains(root):
    """root/old: the stdlib's .py files but the GUI code; root/new: the GUI code (tkinter,
    IDLE, turtle and their tests, ~2 MB), a domain the base model never saw."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    for d, dirs, files in os.walk(stdlib):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        for f in (f for f in files if f.endswith(".py")):
            rel = os.path.relpath(os.path.join(d, f), stdlib)
            dest = os.path.join(root, "new" if any(g in rel for g in GUI) else "old", rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(os.path.join(d, f), "rb") as src:  # a few test files are not UTF-8 on purpose
                text = src.read().decode("utf-8", errors="replace")
            with open(dest, "w", encoding="utf-8") as out:
                out.write(text)


def run_script(args, log):
    """Runs a script to the end; its exit code and its peak memory (max RSS, MB)."""
    with open(log, "w") as out:  # from the repository, where the scripts and their relative paths are
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def val_bpb(ckpt_path, data_dir):
    """A checkpoint's val bits per byte on a prepared dataset, as train.py evaluates it."""
    import checkpoint
    import train
    m, _, ckpt = checkpoint.load_model(ckpt_path)
    meta, enc = prepare.load_meta(data_dir)
    block = ckpt["settings"]["block_size"]
    val = train.val_sequences(data_dir, block, ckpt["settings"]["eval_tokens"] // block)
    n_bytes = torch.from_numpy(prepare.token_bytes(enc))
    return train.evaluate(m, val, n_bytes, contextlib.nullcontext(), None, 0, 1, False)[1]


# the quickstart as it was when the study ran (README): its settings since changed
STUDY_QUICKSTART = ["--learning_rate=5e-3", "--value_embeds=False", "--eval_interval=200"]


def bench_lora(tiny=False, root=os.path.join("out", "lora_study")):
    import checkpoint
    steps, ranks, base_steps, study = (2, (2,), 2, TINY_TRAIN + ["--total_batch_size=128"]) if tiny else \
        (100, (4, 16, 64), 400, STUDY_QUICKSTART + ["--total_batch_size=8192"])
    data, runs = os.path.join(root, "data"), os.path.join(root, "runs")
    os.makedirs(runs, exist_ok=True)
    if not os.path.exists(os.path.join(data, "new", "meta.json")):
        note("lora: splitting the stdlib into the old domain and the GUI code, and preparing both")
        lora_domains(os.path.join(root, "src"))
        for args in [[f"--dataset={root}/src/old", f"--tokenizer=bpe:{300 if tiny else 4096}", "--val_fraction=0.02"],
                     [f"--dataset={root}/src/new", f"--tokenizer={data}/old", "--val_fraction=0.1"]]:
            code, _ = run_script(["prepare.py", *args, f"--data_dir={data}", *(["--max_docs=60"] if tiny else [])],
                                 os.path.join(root, "prepare.log"))
            assert code == 0, open(os.path.join(root, "prepare.log")).read()[-2000:]
    base = os.path.join(runs, "base", "ckpt.pt")
    if not os.path.exists(base):
        note(f"lora: pretraining the base on the old domain (the quickstart's model, {base_steps} steps)")
        code, _ = run_script(["train.py", f"--data_dir={data}", "--dataset=old", f"--out_dir={runs}/base",
                              f"--max_steps={base_steps}", *study], os.path.join(runs, "base.log"))
        assert code == 0, open(os.path.join(runs, "base.log")).read()[-2000:]
    # the same steps and tokens for every method; full at a fifth of pretraining's lr, the adapters at 10x that
    common = [f"--data_dir={data}", "--dataset=new", f"--init_from={base}", f"--max_steps={steps}",
              f"--eval_interval={steps}", f"--warmup_steps={min(10, steps)}", "--log_interval=10", "--overwrite",
              study[-1], *(["--block_size=32", "--micro_batch=2", "--eval_tokens=256"] if tiny else [])]
    methods = [("full", 0, ["--learning_rate=1e-3"])] + [
        (variant, r, [f"--lora_rank={r}", f"--lora_alpha={2 * r}", f"--lora_variant={variant}", "--learning_rate=1e-2"])
        for variant in ("lora", "rslora", "dora") for r in ranks]
    rows = [("base (no fine-tuning)", "", 0, None, None, val_bpb(base, f"{data}/new"), val_bpb(base, f"{data}/old"))]
    for name, rank, args in methods:
        out = os.path.join(runs, f"{name}{rank or ''}")
        note(f"lora: fine-tuning {name} {rank or ''} for {steps} steps")
        code, peak = run_script(["train.py", *common, *args, f"--out_dir={out}"], out + ".log")
        assert code == 0, open(out + ".log").read()[-2000:]
        logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        step_ms = np.median([r["step_ms"] for r in logs if "step_ms" in r])
        ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
        trained = sum(t.numel() for t in ckpt["model"].values()) if ckpt["lora"] else None
        if trained is None:
            trained = checkpoint.model_from_checkpoint(ckpt).num_params()
        rows.append((name, rank, trained, step_ms, peak, [r for r in logs if "val_bpb" in r][-1]["val_bpb"],
                     val_bpb(os.path.join(out, "ckpt.pt"), f"{data}/old")))
    header(f"LoRA against full fine-tuning: {steps} steps of {study[-1].split('=')[1]} tokens on the stdlib's GUI "
           "code, cpu",
           {"torch": torch.__version__})
    print("| method | rank | trainable params | step time | peak memory | new domain val bpb (learns) | "
          "old domain val bpb after (forgets) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rank, trained, ms, peak, new, old in rows:
        print(f"| {name} | {rank} | {f'{trained:,}' if trained else ''} | {f'{ms:.0f} ms' if ms else ''} | "
              f"{f'{peak:.0f} MB' if peak else ''} | {new:.3f} | {old:.3f} |")
    # a run that ended worse than the base on the new domain learned nothing (diverged):
    # left out of the plot, where it would squeeze the others into a corner
    learned = [(f"{n[0].upper()}{r or ''}", old, new) for n, r, _, _, _, new, old in rows[1:] if new < rows[0][5]]
    if learned:
        print("\n" + text_plot(learned, "old domain bpb (forgets: to the right)", "new domain bpb (learns: down)"))
    print("\nF: full, L: LoRA, R: rsLoRA, D: DoRA, with the rank. Not plotted (no better than the base on "
          "the new domain): " + (", ".join(f"{n} {r}" for n, r, *_, new, _ in rows[1:] if new >= rows[0][5]) or "none"))


def text_plot(points, xlabel, ylabel, width=60, height=16):
    """A scatter plot in text: points are (label, x, y)."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for label, x, y in points:
        col = round((x - x0) / max(x1 - x0, 1e-9) * (width - len(label)))
        row = round((y - y0) / max(y1 - y0, 1e-9) * (height - 1))
        grid[row][col:col + len(label)] = label
    lines = [f"{y0 + (y1 - y0) * i / (height - 1):7.3f} |" + "".join(r) for i, r in enumerate(grid)]
    return "\n".join(["```", f"{ylabel}", *lines, " " * 8 + "+" + "-" * width,
                      f"{'':8}{x0:<10.3f}{xlabel:^{width - 20}}{x1:>10.3f}", "```"])


# -----------------------------------------------------------------------------
# fsdp: peak memory per process under DDP and under FSDP, 2 processes on the CPU (gloo)


def bench_fsdp(tiny=False, data_dir=None):
    """The same training steps of a 170M-weight model (680 MB in fp32) on 2 processes: DDP
    keeps all of its weights, gradients and AdamW state in each, FSDP half of them. Peak
    memory is the largest max RSS of the processes, so it includes what every process has
    anyway (Python, torch, data): a smaller model's run gives that floor."""
    import model
    steps, layers, width, block = (1, 2, 64, 32) if tiny else (3, 24, 768, 256)
    with tempfile.TemporaryDirectory() as tmp:
        if not tiny:
            note("fsdp: preparing a small dataset")
            code, _ = run_script(["prepare.py", f"--data_dir={tmp}", "--max_docs=40", "--tokenizer=bpe:300"],
                                 os.path.join(tmp, "prepare.log"))
            assert code == 0, open(os.path.join(tmp, "prepare.log")).read()[-2000:]
        # 2 sequences of 256 tokens on each process: a step without accumulation, small activations
        common = [f"--data_dir={data_dir or tmp}", f"--max_steps={steps}", f"--eval_interval={steps}",
                  f"--eval_tokens={8 * block}", f"--block_size={block}", "--micro_batch=2",
                  f"--total_batch_size={4 * block}", "--device=cpu", "--value_embeds=False"]
        big = [f"--n_layer={layers}", f"--n_head={width // 64}", f"--n_embd={width}"]
        floor = ["--n_layer=1", "--n_head=2", "--n_embd=64"]
        rows = []
        for i, (name, shape, parallel) in enumerate([("floor: 1 block, 64 wide", floor, "ddp"), ("DDP", big, "ddp"),
                                                     ("FSDP", big, "fsdp")]):
            note(f"fsdp: {steps} steps, {name}, 2 processes")
            log = os.path.join(tmp, f"run{i}.log")
            code, peak = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                                     *common, *shape, f"--parallel={parallel}", f"--out_dir={tmp}/run{i}"], log)
            assert code == 0, open(log).read()[-2000:]
            rows.append((name, peak))
    cfg = model.GPTConfig(vocab_size=300, block_size=block, n_layer=layers, n_head=width // 64, n_embd=width)
    with torch.device("meta"):
        n = model.GPT(cfg).num_params()
    header(f"Peak memory per process, 2 processes on the CPU: {n / 1e6:.0f}M weights ({n * 4 / 1e6:.0f} MB fp32), "
           f"{steps} steps", {"torch": torch.__version__})
    print("| run | peak memory per process | above the floor | vs DDP |")
    print("|---|---:|---:|---:|")
    floor_mb, ddp_mb = rows[0][1], rows[1][1]
    for name, peak in rows:
        above = peak - floor_mb
        vs = above / (ddp_mb - floor_mb) if ddp_mb != floor_mb else float("nan")
        print(f"| {name} | {peak:,.0f} MB | {f'{above:,.0f} MB' if above else ''} | {f'**{vs:.2f}x**' if above else ''} |")


# -----------------------------------------------------------------------------
# plot and sweep: runs to look at, and grids of runs (python bench.py plot out/a out/b;
# python bench.py sweep --learning_rate=1e-3,3e-3)

SAME_RUN = {"out_dir", "init_from", "overwrite", "data_dir", "device", "compile", "log_interval", "eval_interval",
            "ckpt_interval", "ckpt_minutes", "wandb_log", "wandb_project", "wandb_run_name"}  # not what a run is


def run_record(directory):
    """A run's log.jsonl rows and settings (from its ckpt.pt; {} without one)."""
    import checkpoint
    log = os.path.join(directory, "log.jsonl")
    if not os.path.exists(log):
        raise SystemExit(f"bench.py: error: {log} not found: give the out_dir of a train.py run")
    path = os.path.join(directory, "ckpt.pt")
    settings = checkpoint.load_checkpoint(path)["settings"] if os.path.exists(path) else {}
    return checkpoint.read_log(log), settings


def differences(settings):
    """Each run's label: the settings in which the runs differ, key=value, with the seed."""
    keys = sorted({k for s in settings for k in s if k not in SAME_RUN and len({repr(x.get(k)) for x in settings}) > 1})
    return [", ".join(f"{k}={s.get(k)}" for k in keys) for s in settings]


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files, not windows
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        raise SystemExit("bench.py: error: plots need matplotlib: pip install matplotlib") from None


def bench_plot(dirs, path="plot.png"):
    """A PNG of runs from their log.jsonl files: the train loss and the val bits per byte
    against the tokens seen, and the downstream evals' scores where there are any; each run
    labelled by the settings in which it differs from the others. Returns the labels."""
    import config
    plt = pyplot()
    records = [run_record(d) for d in dirs]
    labels = differences([s for _, s in records]) if len(dirs) > 1 else [""]
    labels = [label or os.path.basename(os.path.normpath(d)) for label, d in zip(labels, dirs)]
    scores = sorted({k for rows, _ in records for r in rows for k in r if k == "core" or k.endswith("_acc_norm")})
    fig, axes = plt.subplots(1, 2 + bool(scores), figsize=(6 * (2 + bool(scores)), 4.5), squeeze=False)
    for (rows, settings), label in zip(records, labels):
        tokens = settings.get("total_batch_size", 1) / 1e6  # per step, in millions
        for ax, key in zip(axes[0], ["loss", "val_bpb"]):
            points = [(r["step"] * tokens, r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None) if points else None
        for key in scores:
            points = [(r["step"] * tokens, r[key]) for r in rows if key in r]
            axes[0][2].plot(*zip(*points), label=f"{label} {key}", marker=".") if points else None
    for ax, title in zip(axes[0], ["train loss", "val bits per byte", "evals (acc_norm; CORE)"]):
        ax.set(title=title, xlabel="tokens seen (millions)" if records[0][1] else "steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with config.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    print(f"bench: wrote {path}: {', '.join(labels)}")
    return labels


def sweep_grid(argv):
    """python bench.py sweep [config.py] --key=v1,v2 ... [--seeds=N] [--out=DIR]: the runs,
    each (its name, its train.py arguments), every combination of the listed values, each
    with every seed; refused before anything runs when a setting is unknown, a list is
    empty, or a value has the wrong type. String settings list their values with | (their
    values may hold commas)."""
    import itertools
    import config
    import prepare
    import train
    defaults, others = config.setting_names(vars(train)), config.setting_names(vars(prepare))
    head = argv[:1] if argv and not argv[0].startswith("-") else []
    seeds, out, grid, fixed = 1, os.path.join("out", "sweep"), {}, {}  # key -> values; key -> its argument
    for arg in argv[len(head):]:
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bench.py sweep: error: expected --key=value or --key=v1,v2, got {arg!r}")
        if key == "seeds":
            if not (text.isdigit() and int(text) >= 1):
                raise SystemExit(f"bench.py sweep: error: --seeds={text!r}: it must be 1 or more")
            seeds = int(text)
        elif key == "out":
            out = text
        elif key not in defaults:
            config.configure(dict(defaults), [arg])  # the unknown-setting error, with its suggestions
        else:
            values = text.split("|" if isinstance(defaults[key], str) else ",")
            if not text or not all(values):
                raise SystemExit(f"bench.py sweep: error: --{key}={text!r}: an empty value; give one or more")
            grid.pop(key, None), fixed.pop(key, None)  # the last one given wins, as on train.py's command line
            (grid.__setitem__(key, values) if len(values) > 1 else fixed.__setitem__(key, arg))
    fixed = list(fixed.values())
    runs = []
    for combo in itertools.product(*grid.values()):
        for seed in range(1337, 1337 + seeds):
            chosen = [f"--{k}={v}" for k, v in zip(grid, combo)] + [f"--seed={seed}"]
            name = ",".join(a[2:] for a in chosen).replace("/", "_")
            config.configure(dict(defaults), head + fixed + chosen, others=others)  # each value's type, now
            runs.append((name, head + fixed + chosen + [f"--out_dir={os.path.join(out, name)}"]))
    return runs, grid, out


def bench_sweep(argv):
    """Runs a grid of train.py runs (sweep_grid), one per GPU at a time (one at a time on a
    CPU), each in its own out_dir; a run that finished is skipped and one cut short is
    resumed, so an interrupted sweep continues. Then a table of each setting's final val
    bits per byte (mean and spread over the seeds), tokens/s and time, and plots."""
    runs, grid, out = sweep_grid(argv)
    slots = max(1, torch.cuda.device_count())
    running, done = [], []
    for name, args in runs:
        directory = os.path.join(out, name)
        path = os.path.join(directory, "ckpt.pt")
        if os.path.exists(os.path.join(directory, "sweep.json")):
            note(f"sweep: {name}: finished before, skipped")
            continue
        extra = ["--init_from=resume"] if os.path.exists(path) else ["--overwrite"]
        while len(running) >= slots:
            running = [r for r in running if r[0].poll() is None]
            time.sleep(0.5)
        note(f"sweep: {name}: training")
        os.makedirs(directory, exist_ok=True)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(len(done) % slots)) if torch.cuda.is_available() else None
        log = open(os.path.join(directory, "sweep.log"), "w")
        proc = subprocess.Popen([sys.executable, "train.py", *args, *extra], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        running.append((proc, directory, time.time(), log))
        done.append(name)
        running = finish_runs(running, wait=slots == 1)
    finish_runs(running, wait=True)
    print(sweep_table(out, runs, grid))
    if runs:
        bench_plot([os.path.join(out, name) for name, _ in runs], os.path.join(out, "curves.png"))
        sweep_plot(out, runs, grid, os.path.join(out, "sweep.png"))


def finish_runs(running, wait):
    """The runs still going; those that ended get their sweep.json (time, exit code)."""
    left = []
    for proc, directory, t0, log in running:
        if wait:
            proc.wait()
        if proc.poll() is None:
            left.append((proc, directory, t0, log))
            continue
        log.close()
        if proc.returncode:
            raise SystemExit(f"bench.py sweep: error: {directory} failed (exit code {proc.returncode}): see "
                             f"{directory}/sweep.log; run the sweep again to go on")
        with open(os.path.join(directory, "sweep.json"), "w") as f:
            json.dump({"wall_s": time.time() - t0}, f)
    return left


def sweep_results(out, runs, grid):
    """{swept values: [(final val bpb, mean tokens/s, wall s) per seed]}, from the runs' files."""
    results = {}
    for name, args in runs:
        rows = [json.loads(line) for line in open(os.path.join(out, name, "log.jsonl"))]
        wall = json.load(open(os.path.join(out, name, "sweep.json")))["wall_s"]
        bpb = [r["val_bpb"] for r in rows if "val_bpb" in r][-1]
        tps = np.mean([r["tokens_per_s"] for r in rows if "tokens_per_s" in r] or [float("nan")])
        key = tuple(a for a in args if a.split("=")[0][2:] in grid)
        results.setdefault(key, []).append((bpb, tps, wall))
    return results


def sweep_table(out, runs, grid):
    lines = [f"\n### Sweep: {', '.join(grid) or 'one setting'}, {out}\n",
             "| settings | seeds | final val bpb | tokens/s | time |", "|---|---:|---:|---:|---:|"]
    for key, seeds in sweep_results(out, runs, grid).items():
        bpb = [b for b, _, _ in seeds]
        spread = f" ± {(max(bpb) - min(bpb)) / 2:.4f}" if len(bpb) > 1 else ""
        lines.append(f"| {' '.join(a[2:] for a in key) or '(as given)'} | {len(seeds)} | {np.mean(bpb):.4f}{spread} | "
                     f"{np.mean([t for _, t, _ in seeds]):,.0f} | {np.mean([w for _, _, w in seeds]):.0f} s |")
    return "\n".join(lines)


def sweep_plot(out, runs, grid, path):
    """The final val bits per byte against each swept setting (the others averaged over)."""
    import config
    plt = pyplot()
    results = sweep_results(out, runs, grid)
    fig, axes = plt.subplots(1, max(1, len(grid)), figsize=(5 * max(1, len(grid)), 4), squeeze=False)
    for ax, key in zip(axes[0], grid):
        values = grid[key]
        means = [np.mean([b for k, seeds in results.items() if f"--{key}={v}" in k for b, _, _ in seeds])
                 for v in values]
        numeric = all(v.replace(".", "", 1).replace("e-", "", 1).replace("e", "", 1).isdigit() for v in values)
        xs = [float(v) for v in values] if numeric else list(range(len(values)))
        ax.plot(xs, means, marker="o")
        if numeric and max(xs) > 10 * min(xs) > 0:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, values)
        ax.set(xlabel=key, ylabel="final val bits per byte", title=f"{key}: mean over the rest and the seeds")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with config.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


SECTIONS = {"tokenizer": bench_tokenizer, "prepare": bench_prepare, "train": bench_train, "model": bench_model,
            "attention": bench_attention, "kernels": bench_kernels, "sample": bench_sample,
            "memory": bench_memory, "fsdp": bench_fsdp}  # train first: its subprocess wants idle cores
STUDIES = {"lora": bench_lora, "gpu": bench_gpu}  # run only when named: python bench.py lora
NEEDS_DATA = ("train", "fsdp")  # sections that train on a prepared dataset: --data_dir (the quickstart's data/)


def main(argv):
    """python bench.py [--tiny] [--data_dir=DIR] [--out=DIR] [section ...]; python bench.py plot
    DIR ... [--out=FILE.png]; python bench.py sweep [config.py] --key=v1,v2 ... [--seeds=N]"""
    if argv[:1] == ["plot"]:
        dirs = [a for a in argv[1:] if not a.startswith("--out=")]
        out = ([a.split("=", 1)[1] for a in argv[1:] if a.startswith("--out=")] or ["plot.png"])[-1]
        return bench_plot(dirs, out) if dirs else sys.exit("bench.py plot: give one or more out_dir of runs")
    if argv[:1] == ["sweep"]:
        return bench_sweep(argv[1:])
    tiny, data_dir, out, names = False, "data", "gpu_report", []
    if "--tiny" in argv and not torch.cuda.is_available():  # flash.py through triton's interpreter, on a CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for arg in argv:
        if arg == "--tiny":
            tiny = True
        elif arg.startswith("--data_dir="):
            data_dir = arg.split("=", 1)[1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        elif arg in SECTIONS or arg in STUDIES:
            names.append(arg)
        else:
            sys.exit(f"bench.py: unknown section or flag {arg!r}; choose from --tiny, --data_dir=DIR, --out=DIR, "
                     f"{', '.join(SECTIONS | STUDIES)}")
    for name in names or list(SECTIONS):
        kwargs = {"data_dir": data_dir} if name in NEEDS_DATA else {}
        if name == "lora" and tiny:
            kwargs["root"] = tempfile.mkdtemp(prefix="lora_study_")
        if name == "gpu":
            kwargs["out"] = out
        (SECTIONS | STUDIES)[name](tiny=tiny, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
