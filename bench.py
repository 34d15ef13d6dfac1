"""
bench.py: every benchmark of the project, printed as markdown tables.

    python bench.py              # every section
    python bench.py tokenizer    # just one

Each section times our code and a reference in the same run, on the same machine,
and prints the ratio. Numbers go into README.md with the date, device and versions.
Read the code it measures first: bpe.py, prepare.py, model.py.
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

import numpy as np
import torch
import torch.nn.functional as F

import bpe
import prepare


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


def bench_tokenizer(vocab_sizes=(8192, 32768)):
    import regex
    import tiktoken
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    versions = {"regex": regex.__version__, "tiktoken": tiktoken.__version__,
                "tokenizers": tokenizers.__version__ if tokenizers else "not installed"}
    docs = list(prepare.stdlib_docs("train"))
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
            ours = lambda: trained.__setitem__(size, bpe.train([path], size))  # noqa: E731
            t_ours, t_hf = best_of(ours, lambda: hf_train(tokenizers, path, size), repeat=2) if tokenizers \
                else (best_of(ours, repeat=2), None)
            hf = f"{t_hf:.2f} s" if t_hf else "n/a"
            ratio = f"**{t_hf / t_ours:.2f}x**" if t_hf else "n/a"
            print(f"| {size} | {t_ours:.2f} s | {hf} | {ratio} |")

    # encoding: one core, the last 4 MB of the corpus
    sample = text[-4_000_000:]
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
        ours_gpt2 = bpe.Tokenizer(gpt2._mergeable_ranks, [], gpt2._special_tokens)
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


def cold(tok):
    """tok.encode_ordinary with its cache emptied first, so each run is timed cold."""
    def encode(text):
        tok._cache.clear()
        return tok.encode_ordinary(text)
    return encode


# -----------------------------------------------------------------------------
# prepare: tokenizing documents into shards over all cores, against one tiktoken process


def bench_prepare():
    import tiktoken
    docs = list(prepare.stdlib_docs("train"))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec, enc = "gpt2", tiktoken.get_encoding("gpt2")
        except Exception:  # offline without tiktoken's cached gpt2 files: our own BPE
            bpe.train(docs, 4096).save(os.path.join(tmp, "tok.bpe"))
            spec, enc = "tok.bpe", bpe.load_tokenizer("tok.bpe", tmp)
        dtype = prepare.token_dtype(enc.n_vocab)
        note(f"prepare: tokenizing {mb:.1f} MB, ours and one tiktoken process, alternating, best of 3")

        def ours():
            with contextlib.redirect_stdout(io.StringIO()):
                prepare.tokenize_split(docs, "train", tmp, spec, enc.eot_token, dtype, os.cpu_count())

        def reference():  # the same work in one process: encode, then one array
            ids = []
            for doc in docs:
                ids.append(enc.eot_token)
                ids += enc.encode_ordinary(doc)
            np.array(ids, dtype=dtype).tofile(os.path.join(tmp, "ref.bin"))

        t_ref, t_ours = best_of(reference, ours)
    header(f"Tokenizing into shards: {mb:.1f} MB of stdlib source, tokenizer {spec}",
           {"tiktoken": tiktoken.__version__, "numpy": np.__version__})
    print("| pipeline | MB/s | speedup |")
    print("|---|---:|---:|")
    print(f"| tiktoken, one process (reference) | {mb / t_ref:.1f} | 1.00x |")
    print(f"| prepare.py, {os.cpu_count()} processes, writing shards | {mb / t_ours:.1f} | **{t_ref / t_ours:.2f}x** |")


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


def train_settings(args=()):
    """train.py's settings after a config file and overrides, as a dict (its globals untouched)."""
    import config
    import train
    settings = config.setting_names(vars(train))
    config.configure(settings, list(args), others=config.setting_names(vars(prepare)))
    return settings


def quickstart(**overrides):
    """GPTConfig of the quickstart model (train.py's defaults), and its name for a table."""
    import train
    cfg = dataclasses.replace(train.model_config(4096, train_settings()), **overrides)
    return cfg, f"{cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.pos} positions, vocab {cfg.vocab_size}"


def bench_model():
    import model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, name = quickstart(pos="learned")  # GPT-2 blocks, as the baseline's
    shapes = [(f"quickstart shapes, GPT-2 blocks: {name}", cfg, 16 * 512 // cfg.block_size),
              ("GPT-2 124M: 12 layers, 768 wide, vocab 50257", model.GPTConfig(
                  vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), 1 if device == "cpu" else 8)]
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


def bench_attention():
    if not torch.cuda.is_available():
        print("\n### Attention\n\nneeds a CUDA GPU: skipped")
        return
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import flash

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

    def measure(fn, q, k, v, causal):
        """ms for forward, backward, forward + backward, and the peak memory of a step in MB."""
        do = torch.randn_like(q)
        fwd = triton.testing.do_bench(lambda: fn(q, k, v, causal))
        o = fn(q, k, v, causal)
        bwd = triton.testing.do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        both = triton.testing.do_bench(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
        o = None  # free it before measuring the peak
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
        return fwd, bwd, both, (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    header(f"Attention, bf16, {torch.cuda.get_device_name()}: TFLOP/s (forward 4·B·H·N²·d, halved when causal; "
           "backward 2.5x that)", {"torch": torch.__version__, "triton": triton.__version__})
    print("| N | d | causal | flash.py fwd / bwd / both | SDPA fwd / bwd / both | naive both | both vs SDPA | "
          "peak MB flash.py / SDPA |")
    print("|---:|---:|---|---|---|---:|---:|---|")
    for d in (64, 128):
        for causal in (True, False):
            for n in (512, 1024, 2048, 4096, 8192, 16384):
                B, H = max(1, 16384 // n), 2048 // d  # 16k tokens of a 2048-wide model
                q, k, v = (torch.randn(B, n, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                flops = 4 * B * H * n * n * d / (2 if causal else 1)
                res = {name: measure(fn, q, k, v, causal) for name, fn in impls.items()
                       if name != "naive" or n <= 4096}
                tf = {name: [f / t * 1e-9 for f, t in zip((flops, 2.5 * flops, 3.5 * flops), r[:3])]
                      for name, r in res.items()}
                fmt = lambda xs: " / ".join(f"{x:.0f}" for x in xs)  # noqa: E731
                naive_both = f"{tf['naive'][2]:.0f}" if "naive" in tf else "n/a"
                print(f"| {n} | {d} | {causal} | {fmt(tf['flash.py'])} | {fmt(tf['SDPA flash'])} | {naive_both} | "
                      f"**{res['SDPA flash'][2] / res['flash.py'][2]:.2f}x** | "
                      f"{res['flash.py'][3]:.0f} / {res['SDPA flash'][3]:.0f} |")
    q, k, v = (torch.randn(1, 16384, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ms = {name: measure(impls[name], q, k, v, True)[2] for name in ("flash.py", "SDPA flash")}
    print(f"\nB=1, H=16, N=16384, d=64, causal, bf16, forward + backward: flash.py {ms['flash.py']:.2f} ms, "
          f"SDPA flash {ms['SDPA flash']:.2f} ms")


# -----------------------------------------------------------------------------
# train: whole training steps of train.py (data, accumulation, optimizer, logging)
# against a plain eager PyTorch loop over the same model


def bench_train(config=None, steps=30):
    import subprocess
    import model
    import train
    args = [config] if config else []  # the quickstart by default
    note(f"train: {steps} steps of train.py {' '.join(args) or '(the quickstart)'}, then a plain loop")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", *args, f"--max_steps={steps}", "--eval_interval=100000",
               "--log_interval=10", f"--out_dir={tmp}", "--warmup_steps=1"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"\n### Training\n\ntrain.py failed (is the data prepared?): {run.stderr.strip()[-300:]}")
            return
        logs = [json.loads(line) for line in open(os.path.join(tmp, "log.jsonl")) if '"loss"' in line]
        ours = [r for r in logs if r["step"] > 10]  # after the first steps (warm-up, compilation)
        tps = sum(r["tokens_per_s"] for r in ours) / len(ours)
        mfu = ours[-1]["mfu"]
    # the baseline: the same model and batch, a bare loop (no accumulation bookkeeping, no logging)
    s = train_settings(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dataclasses.replace(train.model_config(4096 if not config else 50257, s), attn="sdpa")
    m = model.GPT(cfg).to(device)
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


# -----------------------------------------------------------------------------
# memory: a training step's peak memory and time with the plain loss, the chunked loss
# (loss_chunk), and the chunked loss with activation checkpointing


def memory_variants(chunk):
    return {"plain": dict(loss_chunk=0, activation_checkpointing=False),
            f"chunked loss, {chunk} tokens a chunk": dict(loss_chunk=chunk, activation_checkpointing=False),
            "chunked loss + activation checkpointing": dict(loss_chunk=chunk, activation_checkpointing=True)}


def training_step(cfg, batch, device):
    """A model of cfg (a dict of GPTConfig fields) and a function that runs one training step
    of it: forward and backward, with bf16 autocast on CUDA as train.py."""
    import model
    torch.manual_seed(0)
    m = model.GPT(model.GPTConfig(**cfg)).to(device)
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


def memory_peak(cfg, batch, keep_freed):
    """One training step's peak memory in MB. Run in a fresh process: one whose allocator
    already holds freed memory would reuse it and show a lower peak."""
    import train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if keep_freed and device == "cpu":
        train.keep_freed_memory()
    return peak_mb(training_step(cfg, batch, device)[1], device)


def memory_times(cfg, batch, variants, repeat):
    """Seconds of a training step in each variant (GPTConfig fields to set), alternating,
    best of `repeat`, after one step each to warm up. Run in its own process, with
    train.py's keep_freed_memory on a CPU, which must not change the other sections."""
    import train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        train.keep_freed_memory()
    m, step = training_step(cfg, batch, device)

    def run(variant):
        def fn():
            for key, value in variant.items():
                setattr(m.cfg, key, value)
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


def bench_memory(chunk=1024):
    import model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qs, name = quickstart()
    gpt2 = model.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    shapes = [(f"the quickstart: {name}", qs, train_settings()["micro_batch"], 3),
              ("GPT-2 124M: 12 layers, 768 wide, vocab 50257", gpt2, 8, 2)]
    rows = []
    for name, cfg, batch, repeat in shapes:
        variants = memory_variants(chunk)
        note(f"memory: {name}, {batch} x {cfg.block_size}: step times, alternating, best of {repeat}")
        times = in_fresh_process(memory_times, dataclasses.asdict(cfg), batch, list(variants.values()), repeat)
        for (label, variant), t in zip(variants.items(), times):
            run = dataclasses.asdict(dataclasses.replace(cfg, **variant))
            note(f"memory: {name}, {label}: peaks, each in a fresh process")
            # the loss alone: the model without blocks (embedding, final norm, head, loss)
            loss = [in_fresh_process(memory_peak, dict(run, n_layer=0), batch, keep) for keep in (True, False)]
            step = [in_fresh_process(memory_peak, run, batch, keep) for keep in (True, False)]
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


def bench_sample(new_tokens=512):
    import model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, name = quickstart()
    shapes = [(f"the quickstart's: {name}, block {cfg.block_size}", cfg)]
    if device == "cuda":
        shapes.append(("GPT-2 124M, block 1024", model.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12,
                                                                  n_head=12, n_embd=768)))
    header(f"Sampling {new_tokens} new tokens, batch 1, {device}", {"torch": torch.__version__})
    print("| model | KV cache | no cache (nanoGPT-style) | speedup |")
    print("|---|---:|---:|---:|")
    for name, cfg in shapes:
        note(f"sample: {name}, {new_tokens} tokens with and without the cache, alternating, best of 4")
        torch.manual_seed(0)
        m = model.GPT(cfg).to(device).eval()
        if device == "cuda":
            m = m.to(torch.bfloat16)
        idx = torch.zeros(1, 1, dtype=torch.long, device=device)

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
                                   repeat=4)
        print(f"| {name} | {new_tokens / t_cache:.0f} tok/s | {new_tokens / t_plain:.0f} tok/s | "
              f"**{t_plain / t_cache:.1f}x** |")


SECTIONS = {"tokenizer": bench_tokenizer, "prepare": bench_prepare, "train": bench_train, "model": bench_model,
            "memory": bench_memory,
            "attention": bench_attention, "sample": bench_sample}  # train first: its subprocess wants idle cores

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
