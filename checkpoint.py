"""
checkpoint.py: the checkpoint format, ckpt.pt and its shards: save, verify, load; and the export command.

    m, tok, ckpt = checkpoint.load_model("out/quickstart/ckpt.pt")   # or "resume", a run's directory, "gpt2", ...
    python checkpoint.py export out/quickstart/ckpt.pt hf/quickstart --license=mit [--push_to=USER/NAME]

A checkpoint is out/<run>/ckpt.pt, one dict saved with torch.save:

    model_config   GPTConfig's fields                 model       the weights by name (no compile prefixes)
    optimizer      the optimizer's state_dict         scaler      the fp16 loss scaler's state_dict
    step, data     the step; where the data stands    rng         the torch, numpy, python and CUDA RNG states
    settings       the run's resolved settings         tokenizer   {"name", "files"}: the tokenizer, whole
    base           what the run started from: None (scratch), or the model it fine-tunes
    lora           None, or the adapters' settings and their base; then `model` holds only the adapters
    shards         (FSDP only) the directory beside ckpt.pt that holds model and optimizer instead, sharded

It is written to ckpt.new.pt, read back, and renamed over ckpt.pt, whose last version
stays as ckpt.prev.pt: ckpt.pt is whole at every moment, and a checkpoint whose weights
or loss went bad is never saved. load_model turns whatever names a model (a checkpoint,
a run's directory, a pretrained name or a Hugging Face directory) into one, for every
script; the export writes a checkpoint in the Hugging Face format through hf.py.
Read next: hf.py, then evals.py
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import bpe
import hf
import prepare
from config import atomic_write
from model import GPT, GPTConfig, add_lora, grow_vocab, merge_lora

# -----------------------------------------------------------------------------
# Save


def save(path, m, optimizer, scaler, step, data, rng, settings, tok_spec, base, lora, loss, sharded):
    """Saves everything needed to continue exactly; returns False, saving nothing, when the
    model is not healthy: a weight is not finite, or `loss` (what these weights give on
    some val tokens) is not finite or worse than knowing nothing (healthy). Under FSDP
    (sharded) every process calls this and writes its own shard of the weights and
    optimizer state into a directory (save_shards); ckpt.pt, still written last by process
    0, holds the rest and names that directory."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if not healthy(m, loss, sharded):
        return False
    ckpt = {"model_config": dataclasses.asdict(m.cfg), "base": base, "lora": lora, "scaler": scaler.state_dict(),
            "step": step, "data": data, "rng": rng, "settings": settings, "tokenizer": tok_spec}
    if sharded:
        ckpt["shards"] = save_shards(path, m, optimizer, step, lora, master)
        if not master:
            return True
    else:  # the adapters only under LoRA, and where the frozen base comes from
        ckpt["model"], ckpt["optimizer"] = model_state(m, lora), optimizer.state_dict()
    new, prev = path.replace(".pt", ".new.pt"), path.replace(".pt", ".prev.pt")
    try:
        with atomic_write(new, "wb") as f:
            torch.save(ckpt, f)
    except (OSError, RuntimeError) as e:  # torch says "unexpected pos" where the disk is full
        raise WriteError(path, e) from None
    torch.load(new, map_location="cpu", weights_only=False, mmap=True)  # readable, or this raises
    if os.path.exists(path):  # keep the last good one: a hard link, renamed into place
        with contextlib.suppress(FileNotFoundError):
            os.remove(prev + ".tmp")
        os.link(path, prev + ".tmp")
        os.replace(prev + ".tmp", prev)
    os.replace(new, path)
    remove_stale_shards(path)
    return True


def worst_loss(cfg):
    """The loss above which a model has diverged: a nat worse than the uniform guess over
    the vocabulary, ln V, which any model that learned anything beats. A fresh model's loss
    is about ln V."""
    return math.log(cfg.vocab_size) + 1.0


class WriteError(ValueError):
    """A checkpoint that could not be written (a full disk, mostly): where, why, how much room."""

    def __init__(self, path, e):
        where = os.path.dirname(os.path.abspath(path))
        size = os.path.getsize(path) / 1e6 if os.path.exists(path) else None
        free = shutil.disk_usage(where).free / 1e6
        super().__init__(f"cannot write a checkpoint into {where} ({type(e).__name__}: {str(e).strip()[:200]}); its "
                         f"disk has {free:.0f} MB free" + (f", and the last checkpoint took {size:.0f} MB" if size else "")
                         + ": free some space, then resume from the last good checkpoint")


def rng_state(dev):
    """This process's random states, for a checkpoint's list of every process's: torch's
    CPU generator, numpy's, python's, and its own GPU's."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def healthy(m, loss, sharded):
    """Whether the weights are all finite and the probe loss finite and not diverged
    (worst_loss). Under FSDP a process sees only its own shard of each weight, so the
    processes vote: all must be."""
    ok = math.isfinite(loss) and loss <= worst_loss(m.cfg) and all(torch.isfinite(local(p)).all()
                                                                  for p in m.parameters())
    if sharded and dist.is_initialized():
        vote = torch.tensor(float(ok), device=local(next(m.parameters())).device)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        ok = bool(vote)
    return ok


def local(t):
    """This process's part of a tensor: its shard under FSDP (a DTensor), else all of it."""
    return t.to_local() if isinstance(t, DTensor) else t


def model_state(m, lora):
    """The weights a checkpoint keeps, by name (no compile prefixes; this process's shards
    under FSDP): all of them, or under LoRA the adapters only."""
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(m).items() if lora is None or k in trained}


def save_shards(path, m, optimizer, step, lora, master):
    """Writes the weights and optimizer state, sharded as the processes hold them, with
    torch.distributed.checkpoint (DCP): each process writes its own file of its pieces, then
    process 0 a .metadata file mapping every tensor's pieces to files and places, so that
    any number of processes can read it back. Into ckpt.STEP.dcp.tmp/ first, renamed to
    ckpt.STEP.dcp/ once all have written and every file is whole. Returns its name."""
    name = f"ckpt.{step:06d}.dcp"
    tmp, final = os.path.join(os.path.dirname(path), name + ".tmp"), os.path.join(os.path.dirname(path), name)
    if master:  # a save cut short at this step before leaves its directory: start it afresh
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    state = {"model": model_state(m, lora), "optimizer": get_optimizer_state_dict(m, optimizer)}
    with quiet_dcp():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())  # returns once .metadata is written
    if master:
        check_shards(tmp)  # every process's file is there, whole (on several nodes: out_dir must be shared)
        shutil.rmtree(final, ignore_errors=True)  # an unfinished save of this step, which no ckpt.pt names
        os.replace(tmp, final)
    return name


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns whenever one process reads or writes alone, which is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def remove_stale_shards(path):
    """Deletes the shard directories beside path that neither it nor its .prev names: older
    checkpoints, and saves that were cut short."""
    out, keep = os.path.dirname(path), set()
    for f in (path, path.replace(".pt", ".prev.pt")):
        if os.path.exists(f):
            keep.add(torch.load(f, map_location="cpu", weights_only=False, mmap=True).get("shards"))
    for d in os.listdir(out):
        if d.startswith("ckpt.") and d.endswith((".dcp", ".dcp.tmp")) and d not in keep:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)

# -----------------------------------------------------------------------------
# Load


def load_checkpoint(path):
    """A checkpoint that train.py wrote, on the CPU, with "path" added: where it was read
    from. A sharded one holds no weights itself but names its directory of shards, which
    is checked here to be whole; model_from_checkpoint reads them."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py "
                                f"--out_dir={os.path.dirname(path) or '.'}), or check out_dir and init_from")
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
    metadata = dcp.FileSystemReader(directory).read_metadata()
    ends = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in ends.items():
        size = os.path.getsize(os.path.join(directory, name)) if os.path.exists(os.path.join(directory, name)) else 0
        if size < end:
            raise ValueError(f"{directory}/{name} holds {size} bytes of {end}: a process's shard is missing or cut "
                             "short (on several nodes, out_dir must be on a filesystem that all of them share)")


def read_shards(ckpt, state, no_dist=True):
    """Fills `state`, {"model": {name: tensor}, ...} as save() wrote it, in place from a
    sharded checkpoint, whatever the number of processes that wrote it: each tensor is put
    together from the pieces in the files that hold them (a DTensor gets just its own shard).
    no_dist: this process reads alone; else all processes of the run read together."""
    try:
        with quiet_dcp():
            dcp.load(state, checkpoint_id=shards_dir(ckpt), no_dist=no_dist)
    except (dcp.CheckpointException, RuntimeError) as e:  # a name or shape the checkpoint lacks
        raise ValueError(f"{ckpt['path']}: its shards in {shards_dir(ckpt)} do not fit the model: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    return state


def model_from_checkpoint(ckpt, weights=True):
    """The model of a checkpoint. A LoRA checkpoint holds only the adapters: its base is
    loaded again from where it names, checked to be the same weights, and the adapters go
    on top. A sharded checkpoint's weights are put together whole from its shards.
    weights=False leaves the model (or its adapters) as initialised: train.py reads the
    shards once it has sharded the model."""
    lora = ckpt.get("lora")
    if lora is None:
        model = GPT(GPTConfig(**ckpt["model_config"]))
    else:
        if os.path.isabs(lora["base"]) and not os.path.exists(lora["base"]):
            raise ValueError(f"{ckpt['path']} holds LoRA adapters, and their base {lora['base']} is missing: put it "
                             "back there (or a link to it), then load the adapters again")
        model = load_model(lora["base"])[0]  # a checkpoint (its own adapters merged in), or pretrained
        if fingerprint(model) != lora["fingerprint"]:
            raise ValueError(f"the LoRA base {lora['base']} is not the model the adapters were trained on "
                             "(its weights changed); restore it, or train the adapters again")
        with_adapters(model, lora)
    if not weights:
        return model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = ckpt["model"] if "shards" not in ckpt else read_shards(ckpt, {"model": {
        k: t for k, t in model.state_dict().items() if lora is None or k in trainable}})["model"]
    missing, unexpected = model.load_state_dict(saved, strict=lora is None)
    if unexpected or trainable & set(missing):
        raise ValueError(f"the checkpoint's adapters do not fit its LoRA settings: {(unexpected or missing)[:3]}")
    return model


def restore(ckpt, m, optimizer, scaler, lora, rank, dev):
    """The optimizer, the loss scaler and this process's random states as they were at the
    checkpoint, and a sharded checkpoint's weights: whatever the number of processes then
    and now, and whether sharded then or now. A process that the checkpoint had no state
    for (more processes now) keeps the fresh seed it has."""
    if "shards" in ckpt:  # each process reads the pieces it holds now from the files that have them
        state = {"model": model_state(m, lora), "optimizer": get_optimizer_state_dict(m, optimizer)}
        read_shards(ckpt, state, no_dist=not dist.is_initialized())
        # the tensors were filled in place; this also restores what is not one (AdamW's settings)
        set_model_state_dict(m, state["model"], options=StateDictOptions(strict=lora is None))
        set_optimizer_state_dict(m, optimizer, state["optimizer"])
    elif isinstance(m, FSDPModule):  # a whole checkpoint into a sharded model, whose weights it already holds
        saved, names = ckpt["optimizer"], {p: n for n, p in m.named_parameters()}
        order = [names[p] for group in optimizer.param_groups for p in group["params"]]  # the saved numbering
        by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
                   "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]]}
        set_optimizer_state_dict(m, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [dict(ckpt["rng"], cuda=None)]  # older: process 0's
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        np.random.set_state(states[rank]["numpy"])
        random.setstate(states[rank]["python"])
        if states[rank]["cuda"] is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(states[rank]["cuda"], dev)


def resume_settings(ckpt, given, changeable, names):
    """The settings a resumed run takes back from its checkpoint: every one of `names` that
    the config file and command line did not give. A given one must equal the checkpoint's,
    unless it is in `changeable`. Returns {setting: value}, for the caller to apply."""
    # checkpoints from before Muon and value embeddings: what they trained with
    saved = {"optimizer": "adamw", "value_embeds": False, "skips": False, **ckpt["settings"]}
    clash = [f"{k}={given[k]!r} (the checkpoint's: {saved[k]!r})" for k in given
             if k in saved and k not in changeable and given[k] != saved[k]]
    if clash:
        raise ValueError(f"resuming {ckpt['path']} with other settings than it was trained with: {', '.join(clash)}. "
                         f"Only these may change on resume: {', '.join(sorted(changeable))}")
    return {k: v for k, v in saved.items() if k not in given and k in names}

# -----------------------------------------------------------------------------
# What names a model, decided once for every script; fine-tuning's base


def locate(init_from, out_dir=""):
    """What init_from names: ("checkpoint", path) for "resume" (out_dir/ckpt.pt), a
    checkpoint file or a run's directory (holding ckpt.pt); ("pretrained", name_or_dir) for
    a directory of Hugging Face weights or a pretrained model's name."""
    if init_from == "resume":
        return "checkpoint", os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(init_from):
        return "checkpoint", init_from
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        return "checkpoint", os.path.join(init_from, "ckpt.pt")
    if os.path.isdir(init_from) or init_from in prepare.PRETRAINED:
        return "pretrained", init_from
    raise ValueError(f"init_from={init_from!r} names nothing: give resume, a checkpoint file, a run's directory, a "
                     f"directory of Hugging Face weights, or one of {', '.join(prepare.PRETRAINED)}")


def load_model(init_from, out_dir=""):
    """(model, tokenizer spec, checkpoint or None) for whatever init_from names (locate):
    a checkpoint's model with LoRA adapters merged in, or pretrained weights; the spec,
    {"name", "files"}, loads with tokenizer()."""
    kind, where = locate(init_from, out_dir)
    if kind == "pretrained":
        name, directory = prepare.pretrained_tokenizer(where)
        return hf.from_pretrained(where), tokenizer_spec(directory, name), None
    ckpt = load_checkpoint(where)
    return merge_lora(model_from_checkpoint(ckpt)), ckpt["tokenizer"], ckpt


def base_name(name_or_path):
    """How a checkpoint names the model its run started from: a path made absolute, so
    that the run can be continued from anywhere; a pretrained name as it is."""
    return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path


def lora_record(base, m, rank, alpha, dropout, targets, variant, vocab_size):
    """What a LoRA checkpoint keeps besides its adapters: their settings, and their frozen
    base, m, by where it comes from (base_name) and by its fingerprint; vocab_size: the
    data's, when it has tokens the base lacks (a chat's)."""
    return {"base": base_name(base), "fingerprint": fingerprint(m), "rank": rank, "alpha": alpha,
            "dropout": dropout, "targets": targets, "variant": variant, "vocab_size": max(vocab_size, m.cfg.vocab_size)}


def with_adapters(m, lora):
    """m, a LoRA run's base, as the run trains it: the adapters on and, where the data has
    new tokens, its vocabulary grown. Then the token tables train whole too (as PEFT's
    modules_to_save): frozen, every new token would keep the same row, the mean, and the
    model could not tell <|im_start|> from <|im_end|>. They are saved with the adapters."""
    vocab = lora.get("vocab_size", m.cfg.vocab_size)  # (older records lack it)
    grown = vocab > m.cfg.vocab_size
    grow_vocab(m, vocab)
    add_lora(m, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], lora["variant"])
    for table in (m.wte, m.lm_head, *(m.value_embeds or [])) if grown else ():
        if table is not None:
            table.requires_grad_(True)
    return m


def tokenizer_spec(directory, name):
    """What sample.py needs to decode: "gpt2", or a tokenizer's files, stored whole."""
    return {"name": name, "files": {f: open(os.path.join(directory, f), encoding="utf-8").read()
                                    for f in prepare.tokenizer_files(name)} if directory else {}}


def tokenizer(spec, where=None):
    """The tiktoken.Encoding of a tokenizer spec."""
    return bpe.load_tokenizer(spec["name"], files=spec["files"], where=where)


def fingerprint(model):
    """A short hash of a model's weights (the first and last values of every tensor), to
    tell that a LoRA checkpoint's base is still the one it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().float().flatten().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode() + torch.cat([flat[:8], flat[-8:]]).numpy().tobytes())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# Export: python checkpoint.py export CKPT DIR


def export(path, out, dtype="fp32", license="", overwrite=False):
    """Writes the checkpoint at path as a Hugging Face model directory (hf.export), its
    model card filled from the checkpoint and the log.jsonl beside it. Returns the class.
    path: a checkpoint file, or a run's directory (its ckpt.pt)."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt = load_checkpoint(path)
    m = merge_lora(model_from_checkpoint(ckpt))
    s, lora = ckpt["settings"], ckpt.get("lora")
    base = lora["base"] if lora else ckpt.get("base")
    method = f"{lora['variant']} adapters (rank {lora['rank']}, merged in)" if lora else "full fine-tuning"
    facts = {"name": os.path.basename(os.path.dirname(os.path.abspath(path))), "dataset": s["dataset"],
             "tokenizer": ckpt["tokenizer"]["name"], "steps": ckpt["step"],
             "tokens": ckpt["step"] * s["total_batch_size"], "learning_rate": s["learning_rate"],
             "schedule": s["schedule"], "base": base, "method": method, "license": license}
    log = read_log(os.path.join(os.path.dirname(path), "log.jsonl"))
    facts["val"] = ([r for r in log if "val_bpb" in r] or [None])[-1]
    facts["evals"] = ([r for r in log if any(k == "core" or k.endswith("_acc_norm") for k in r)] or [None])[-1]
    return hf.export(m, out, ckpt["tokenizer"]["name"], ckpt["tokenizer"]["files"], facts, dtype, overwrite)


def read_log(path):
    """The rows of a log.jsonl ([] if there is none); a line that is not JSON is an error naming it."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line)) if line.strip() else None
            except ValueError:
                raise ValueError(f"{path}, line {n}: not JSON ({line.strip()[:60]!r}); delete the line, or the "
                                 "file, and export again") from None
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Export a train.py checkpoint to the Hugging Face format.")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("checkpoint", help="a train.py checkpoint, e.g. out/quickstart/ckpt.pt (LoRA adapters are merged)")
    ap.add_argument("out", help="the directory to write")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the weights' dtype")
    ap.add_argument("--license", default="", help="the model's license for its card: mit, apache-2.0, ...")
    ap.add_argument("--push_to", default="", help="then upload it to this Hub repo, USER/NAME (needs HF_TOKEN)")
    ap.add_argument("--overwrite", action="store_true", help="write over a directory that holds other files")
    args = ap.parse_args()
    try:
        if args.push_to and not args.license:
            raise ValueError("--push_to needs --license: a model shared on the Hub says how it may be used")
        arch = export(args.checkpoint, args.out, args.dtype, args.license, args.overwrite)
        remote = ", trust_remote_code=True" if arch == "ScratchGPTForCausalLM" else ""
        print(f"exported {args.checkpoint} to {args.out}/ as {arch}: "
              f"AutoModelForCausalLM.from_pretrained({args.out!r}{remote}) loads it")
        if args.push_to:
            print(f"uploaded: {hf.push_to_hub(args.out, args.push_to, args.license)}")
    except (ValueError, FileNotFoundError, prepare.DownloadError) as e:
        raise SystemExit(f"checkpoint.py: error: {e}") from None
