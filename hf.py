"""
hf.py: the Hugging Face format, in and out: config.json, safetensors, tokenizer.json, the export and the upload.

    model = hf.from_pretrained("gpt2")          # or HuggingFaceTB/SmolLM2-135M, or a directory
    hf.export(model, "hf/x", "tokenizer.bpe", files, facts)   # checkpoint.py's export command calls this

In: a Hugging Face model directory (config.json + model.safetensors) of the gpt2 or llama
family becomes our GPT, its weights renamed by one table (hf_names) that is read both
ways. Out: a model that a transformers class expresses (GPT-2's blocks, or Llama's) goes
out as that class, and transformers loads it with no code of ours; any other (the
quickstart's, with RoPE in GPT-2 blocks and value embeddings) goes out with our model.py
and a short wrapper beside the weights, loaded with trust_remote_code=True. Either way the
tokenizer goes as tokenizer.json, and a model card says what the model is.
Read next: evals.py, the downstream evals; then bench.py, which measures everything.
"""
import json
import math
import os

import torch

import bpe
import model
import prepare  # downloads, for from_pretrained(name)
from config import atomic_write
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config.json


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


def config_from_hf(hf):
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
    return GPTConfig(**{**HF_FAMILY[kind], **kw})


def config_to_hf(cfg, eot_id=None):
    """A Hugging Face config.json for a GPTConfig: GPT2LMHeadModel for GPT-2's settings
    (bias=False too: exported as zero biases, which is exact), LlamaForCausalLM for
    Llama's. A mix that neither class has is an error that names the setting."""
    kind = "gpt2" if cfg.norm == "layernorm" else "llama"
    family = HF_FAMILY[kind]
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

# -----------------------------------------------------------------------------
# The weights' names, and the safetensors files that hold them


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
    """Hugging Face weights renamed (and stacked, transposed) as ours, by hf_names: {our
    name: (the first of their names, for errors; the tensor)}. Every tensor must be used."""
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
        out[ours] = names[0], parts[0] if len(parts) == 1 else torch.cat(parts)
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
    with atomic_write(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            t = t.detach().cpu().contiguous()
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
            f.write(raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes())  # little-endian


def from_pretrained(name_or_dir):
    """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl), SmolLM2 (HuggingFaceTB/SmolLM2-135M,
    -360M), or a directory with a Hugging Face config.json + model.safetensors of either
    family, as our GPT. Downloads go to data/pretrained/ (prepare.py)."""
    directory = prepare.pretrained_dir(name_or_dir, ["config.json", "model.safetensors"])
    with open(os.path.join(directory, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    m = GPT(cfg)
    path = os.path.join(directory, "model.safetensors")
    weights, ours = hf_to_ours(load_safetensors(path), cfg), m.state_dict()
    for name, (theirs, t) in weights.items():
        if name not in ours:
            raise ValueError(f"{path}: tensor {theirs!r} has no place in the model")
        target = ours[name]
        if name in ("wte.weight", "lm_head.weight") and t.shape[0] <= target.shape[0]:
            with torch.no_grad():  # the padded rows: zeros, never read, and the same at every load (fingerprint)
                target[t.shape[0]:].zero_()
            target = target[:t.shape[0]]
        if t.shape != target.shape:
            raise ValueError(f"{path}: tensor {theirs!r} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
    missing = sorted(set(ours) - set(weights))
    if missing:
        raise ValueError(f"{path}: no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return m

# -----------------------------------------------------------------------------
# The tokenizer, written in Hugging Face's formats (bpe.py reads them)


def printable_names(tok):
    """GPT-2's files name each token by printable characters, one per byte (bpe's
    printable_bytes). Returns name(token bytes) -> str, and the merges in order, recovered
    from the ranks when the tokenizer has none (tiktoken's gpt2 keeps only ranks)."""
    char = {b: c for c, b in bpe.printable_bytes().items()}
    merges = tok.merges or bpe.Tokenizer.from_tiktoken(tok.to_tiktoken(), tok.pattern).merges
    return (lambda t: "".join(char[b] for b in t)), merges


def tokenizer_json(tok):
    """The text of a Hugging Face tokenizer.json of a bpe.Tokenizer, which gives the same
    ids: bytes as GPT-2's printable characters, the merges in order, the special tokens as
    added tokens, and the split pattern (GPT-2's is ByteLevel's own)."""
    name, merges = printable_names(tok)
    regex_split = [{"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False}]
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
           "use_regex": tok.pattern == bpe.GPT2_PATTERN}
    if tok.pattern != bpe.GPT2_PATTERN:
        pre = {"type": "Sequence", "pretokenizers": regex_split + [pre]}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "pre_tokenizer": pre,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}  # in id order: tokenizers numbers them so
                         for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])],
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                            "use_regex": True},
        # ignore_merges: a word that is a token whole is that token, as tiktoken (and encode) do
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {name(t): i for t, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[name(a), name(b)] for a, b in merges]}}, ensure_ascii=False)


def gpt2_files(tok):
    """The texts of GPT-2's two files, vocab.json (encoder.json) and merges.txt (vocab.bpe),
    for a bpe.Tokenizer: what transformers' slow GPT2Tokenizer reads, and bpe.py too."""
    name, merges = printable_names(tok)
    vocab = {name(t): i for t, i in tok.ranks.items()} | tok.special_tokens
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(f"{name(a)} {name(b)}\n"
                                                                           for a, b in merges)

# -----------------------------------------------------------------------------
# Export: our model as a Hugging Face model directory


# The custom route's wrapper, written beside the weights and a copy of model.py: the
# interface transformers expects (a config class, a PreTrainedModel with GenerationMixin)
# around our GPT, whose KV cache interface it gives transformers' own cache.
MODELING = '''"""A GPT trained from scratch, for transformers: AutoModelForCausalLM.from_pretrained(this
directory, trust_remote_code=True). The network itself is model.py, beside this file."""
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import GPT, GPTConfig, rope_tables


class ScratchGPTConfig(PretrainedConfig):
    model_type = "scratch_gpt"

    def __init__(self, gpt=None, **kwargs):
        self.gpt = gpt or {}  # model.GPTConfig's fields
        super().__init__(**kwargs)


class ScratchGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ScratchGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**config.gpt))
        self.gpt.attn = "sdpa"  # torch's attention (the project's Triton kernel is not shipped)
        self.post_init()

    def _init_weights(self, module):
        # every weight is loaded from the file; only the RoPE tables, never saved, are made again
        if isinstance(module, GPT) and module.cfg.pos == "rope":
            cos, sin = rope_tables(module.cfg)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: generate one prompt, or prompts of one length")
        cache = cache if cache is not None else past_key_values  # its name in transformers from 5.2x, and before
        logits, _ = self.gpt(input_ids, cache=CacheView(cache) if cache is not None else None, all_logits=True)
        loss = None
        if labels is not None:  # the next token's loss, as transformers' causal LMs compute it
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)  # the cache was filled in place


class CacheView:
    """model.KVCache's interface (pos; update(layer, k, v), (B, T, H, D)) over a transformers Cache."""

    def __init__(self, cache):
        self.cache, self.pos = cache, cache.get_seq_length()

    def update(self, layer, k, v):
        k, v = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)  # it holds (B, H, T, D)
        return k.transpose(1, 2), v.transpose(1, 2)
'''


def custom_config(cfg, eot_id):
    """config.json of the custom route: our GPTConfig whole, what transformers' generation
    reads, and where the code is (auto_map)."""
    return {"architectures": ["ScratchGPTForCausalLM"], "model_type": "scratch_gpt",
            "auto_map": {"AutoConfig": "modeling_gpt.ScratchGPTConfig",
                         "AutoModelForCausalLM": "modeling_gpt.ScratchGPTForCausalLM"},
            "gpt": {k: getattr(cfg, k) for k in GPTConfig.__dataclass_fields__}, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.block_size, "num_hidden_layers": cfg.n_layer, "hidden_size": cfg.n_embd,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "tie_word_embeddings": False,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


EXPORT_MARK = "<!-- exported by checkpoint.py export -->"  # in the card: a directory that may be written over


def check_out_dir(out, overwrite):
    """out may be written: new, empty, an earlier export of ours, or overwrite is given."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file: give the export a directory")
    card = os.path.join(out, "README.md")
    ours = os.path.exists(card) and EXPORT_MARK in open(card, encoding="utf-8", errors="replace").read()
    if os.path.isdir(out) and os.listdir(out) and not ours and not overwrite:
        raise ValueError(f"{out} is not empty, and not an earlier export: choose another directory, or pass "
                         "--overwrite to write over its files")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make {out} ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"{out} is not writable: choose another directory")


def export(m, out, tok_name, tok_files, facts, dtype="fp32", overwrite=False):
    """Writes out/: config.json, model.safetensors, generation_config.json, the tokenizer
    (tokenizer.json, and GPT-2's vocab.json + merges.txt where they came from) and a model
    card, README.md, from `facts` (model_card). m: our GPT, LoRA merged. A model that no
    transformers class expresses also gets modeling_gpt.py and model.py. Each file is
    written atomically. Returns the class it went out as."""
    check_out_dir(out, overwrite)
    tok = bpe.load_tokenizer(tok_name, files=tok_files, fast=False)
    eot = tok.special_tokens.get(bpe.EOT)
    try:
        hf, route = config_to_hf(m.cfg, eot), "class"
        weights = ours_to_hf(m.state_dict(), m.cfg)
    except ValueError as why:  # the custom route: our own code, and our own names prefixed as the wrapper holds them
        hf, route = custom_config(m.cfg, eot), str(why)
        weights = {f"gpt.{k}": v for k, v in m.state_dict().items()}
    hf["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eot is not None:
        tok_config |= {"bos_token": bpe.EOT, "eos_token": bpe.EOT, "model_max_length": m.cfg.block_size,
                       "clean_up_tokenization_spaces": False}
    stops = eot
    if {bpe.IM_START, bpe.IM_END} <= tok.special_tokens.keys():  # tuned on conversations: ChatML, ending its turns
        tok_config |= {"chat_template": bpe.CHATML, "eos_token": bpe.IM_END}
        stops = [tok.special_tokens[bpe.IM_END]] + ([eot] if eot is not None else [])
    files = {"config.json": json.dumps(hf, indent=2),
             "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": stops, "pad_token_id": eot,
                                                   "max_length": m.cfg.block_size}, indent=2),
             "tokenizer_config.json": json.dumps(tok_config, indent=2),
             # a pretrained model's own tokenizer.json goes as it was; any other is written anew
             "tokenizer.json": tok_files.get("tokenizer.json") or tokenizer_json(tok)}
    if tok_name in ("gpt2", "vocab.json"):  # GPT-2's own two files too, for its slow tokenizer
        files["vocab.json"], files["merges.txt"] = gpt2_files(tok)
    if route != "class":
        files["modeling_gpt.py"], files["model.py"] = MODELING, open(model.__file__, encoding="utf-8").read()
    files["README.md"] = model_card(m, hf["architectures"][0], route, facts)
    try:
        for name, text in files.items():
            with atomic_write(os.path.join(out, name)) as f:
                f.write(text)
        save_safetensors({k: v.to(model.DTYPES[dtype]) for k, v in weights.items()},
                         os.path.join(out, "model.safetensors"), {"format": "pt"})
    except OSError as e:
        raise ValueError(f"cannot write the export into {out} ({e.strerror})") from None
    for stale in ({"modeling_gpt.py", "model.py"} if route == "class" else set()) - set(files):
        if os.path.exists(os.path.join(out, stale)):  # an earlier export of the other route left it
            os.remove(os.path.join(out, stale))
    return hf["architectures"][0]


def model_card(m, arch, route, facts):
    """README.md for the Hub: what the model is, how it was made (from scratch, or from
    which base and how), how well it did, how to load it, and its license. facts: name,
    dataset, tokenizer, steps, tokens, learning_rate, schedule, base (or None), method,
    val (a log.jsonl row with val_bpb, or None), evals (a row of evals.py's scores, or
    None), license (or "")."""
    f, cfg = facts, m.cfg
    remote = route != "class"
    front = ["library_name: transformers", "pipeline_tag: text-generation"]
    front += [f"license: {f['license']}"] if f["license"] else []
    front += [f"base_model: {f['base']}"] if f["base"] and f["base"] in prepare.PRETRAINED else []
    how = "trained from scratch" if not f["base"] else f"fine-tuned from `{f['base']}` by {f['method']}"
    load = "AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\"" + (", trust_remote_code=True)" if remote else ")")
    val = (f"{f['val']['val_bpb']:.4f} bits per byte, loss {f['val']['val_loss']:.4f} (step {f['val']['step']})"
           if f["val"] else "no log.jsonl was found beside the checkpoint")
    scores = f.get("evals") or {}
    evals = ", ".join(f"{k.replace('_acc_norm', '')} {v:.4f}" for k, v in scores.items()
                      if k == "core" or k.endswith("_acc_norm"))
    return f"""---
{chr(10).join(front)}
---
{EXPORT_MARK}
# {f['name']}

A {m.num_params() / 1e6:.1f}M-parameter GPT ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, context
{cfg.block_size}), {how}, with an LLM-from-scratch codebase in the spirit of nanoGPT.

- format: {f"transformers' own {arch}: no code of ours is needed" if not remote else
           f"our model.py with a wrapper, modeling_gpt.py (load with trust_remote_code=True), because {route}"}
- data: `{f['dataset']}`, tokenizer `{f['tokenizer']}` ({cfg.vocab_size} tokens)
- training: {f['steps']} steps, {f['tokens']:,} tokens, learning rate {f['learning_rate']} ({f['schedule']})
- validation: {val}{f"{chr(10)}- evals (evals.py; HellaSwag acc_norm, CORE): {evals} (step {scores['step']})" if evals else ""}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model = {load}
print(tok.decode(model.generate(**tok("def main(", return_tensors="pt"), max_new_tokens=50, do_sample=True)[0]))
```

{f"License: {f['license']}." if f["license"] else
 "No license was chosen (export with --license=...): set one before you share the model."}
"""


def push_to_hub(directory, repo, license):
    """Uploads the directory to a Hub model repo with the official client, which handles
    large files (LFS/Xet); imported only here, so the rest needs no huggingface_hub."""
    if not license:
        raise ValueError("uploading needs a license in the model card: export again with --license=NAME "
                         "(mit, apache-2.0, ...; see huggingface.co/docs/hub/repositories-licenses)")
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
