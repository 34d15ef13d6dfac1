"""
evals.py: is the model any good? HellaSwag and CORE's tasks, scored as completions.

    python evals.py --init_from=gpt2 --evals=hellaswag,core        # prepares them once (prepare.py), a table
    python evals.py --init_from=out/gpt2_small --evals=core --max_items=500
    torchrun --standalone --nproc_per_node=8 evals.py --init_from=out/gpt2_small   # items split over processes

An evaluation set is a directory, data/evals/<set>/, that prepare.py makes: tasks.json
gives each task's kind, its few-shot count, its delimiter, the accuracy of guessing at
random (in percent) and whether prompts start with the end-of-text token; each task's
items are a JSONL file, one item a line, of one of three kinds:

    choice  {"context": "The cat sat", "choices": ["on the mat.", "on the moon."], "gold": 0}
    schema  {"contexts": ["The trophy", "The suitcase"], "continuation": "was too big.", "gold": 0}
    lm      {"context": "The capital of France is", "continuation": "Paris"}

A choice item is right when its gold choice, after the context and the delimiter, is the
likeliest continuation: `acc` by the summed loss of its tokens, `acc_norm` by their mean
loss (so that longer choices are not penalized). A schema item is right when the gold
context makes the one continuation likeliest; an lm item when greedy decoding gives the
continuation exactly. Few-shot examples (the task's other items, drawn with a seed of each
item's own) come first, each with its answer, separated by blank lines. CORE (DCLM's
metric, as nanochat measures it) centers each task's accuracy on its random baseline,
(acc - rand) / (1 - rand), and averages over its tasks. train.py runs the same at its
evaluations (its `evals` setting).
Read next: bench.py
"""
import json
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bpe
import checkpoint
import model
import prepare
from config import check, configure

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (config/__init__.py)
init_from = "resume"  # "resume": out_dir/ckpt.pt; a checkpoint file or run directory; a pretrained name or directory
out_dir = "out/quickstart"
evals = "hellaswag"  # evaluation sets, comma-separated: hellaswag, core (prepare.py's EVALS), or a chat dataset
max_items = 0  # items per task, the first of a fixed shuffle; 0: all
batch = 16  # sequences per forward pass
data_dir = "data"  # the sets are in data_dir/evals/, prepared there when missing
device = ""  # "" picks cuda, then mps, then cpu
dtype = ""  # "" picks bf16 on CUDA, fp32 elsewhere


def check_settings():
    check([("evals", evals, bool(set_names(evals)) and all(known(e, data_dir) for e in set_names(evals)),
            f"a comma-separated list of {KNOWN}"),
           ("max_items", max_items, max_items >= 0, "0 (all) or more"),
           ("batch", batch, batch >= 1, "1 or more"),
           ("dtype", dtype, dtype in ("", *model.DTYPES), f"one of {('', *model.DTYPES)}")])


def set_names(text):
    return [n.strip() for n in text.split(",") if n.strip()]


def known(name, directory):
    """Whether evals can name this: a set of prepare.py's EVALS, or a conversation dataset
    prepared in directory (its val.jsonl)."""
    return name in prepare.EVALS or os.path.exists(os.path.join(directory, prepare.dataset_name(name), "val.jsonl"))


KNOWN = f"{', '.join(prepare.EVALS)}, or a conversation dataset prepared in data_dir (python prepare.py --dataset=stdlib_chat)"

# -----------------------------------------------------------------------------
# Tasks: their items, the prompts they make, and the tokens that are scored


def load_set(name, directory):
    """{task: (its settings, its items)} of an evaluation set that prepare.py prepared. A
    conversation dataset's name (prepare.py --dataset=stdlib_chat) is one task of "chat"
    items, its val conversations: is each one's last reply, greedily decoded, exactly it?"""
    chats = os.path.join(directory, prepare.dataset_name(name), "val.jsonl")
    if name not in prepare.EVALS:
        if not os.path.exists(chats):
            raise FileNotFoundError(f"{name}: not an evaluation set ({', '.join(prepare.EVALS)}) nor a prepared "
                                    f"conversation dataset (no {chats}): python prepare.py --dataset={name}")
        meta = {"kind": "chat", "fewshot": 0, "random": 0, "delimiter": "", "file": chats}
        return {name: (meta, [{"messages": m} for m in prepare.read_chats(chats)])}
    where = os.path.join(directory, "evals", name)
    if not os.path.exists(os.path.join(where, "tasks.json")):
        raise FileNotFoundError(f"{where}/tasks.json not found: prepare it with python prepare.py --evals={name}")
    with open(os.path.join(where, "tasks.json"), encoding="utf-8") as f:
        tasks = json.load(f)
    out = {}
    for task, meta in tasks.items():
        with open(os.path.join(where, meta["file"]), encoding="utf-8") as f:
            out[task] = meta, [json.loads(line) for line in f if line.strip()]
    return out


def render(item, meta, shots):
    """The (prompt, answer) pairs to score for an item, after its few-shot examples: one
    per choice (choice), one per context (schema), or the one continuation (lm). Prompt and
    answer are tokenized apart, as llm.c scores HellaSwag, so that the answer's tokens are
    its own whatever the prompt ends with.
    render({"context": "2 + 2 =", "continuation": "4"}, {"kind": "lm", "delimiter": " "}, [])
        -> [("2 + 2 =", " 4")]"""
    d, kind = meta["delimiter"], meta["kind"]
    if kind == "choice":
        prefix = "".join(f"{s['context']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [(f"{prefix}{item['context']}", d + choice) for choice in item["choices"]]
    if kind == "schema":
        prefix = "".join(f"{s['contexts'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [(f"{prefix}{context}", d + item["continuation"]) for context in item["contexts"]]
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    return [(f"{prefix}{item['context'].strip()}", d + item["continuation"])]  # some contexts end in a space


def fewshot(items, i, k):
    """The k few-shot examples of item i: other items of its task, drawn with a seed of i's own."""
    return [items[j] for j in random.Random(1234 + i).sample([j for j in range(len(items)) if j != i], k)] if k else []


def requests(meta, items, enc, block_size):
    """Every sequence to run for a task: (item index, token ids, start, end), the answer's
    tokens at [start, end). A sequence longer than the model's block keeps its last
    block_size tokens."""
    bos = [enc.eot_token] if meta.get("bos") and "<|endoftext|>" in enc.special_tokens_set else []
    out = []
    for i, item in enumerate(items):
        if meta["kind"] == "chat":  # in ChatML, as it was tuned: the reply, and then that it ends
            *question, reply = item["messages"]
            pairs = [(bpe.render_chat(enc, question, generation=True)[0],
                      enc.encode_ordinary(reply["content"]) + [enc.encode_single_token(bpe.IM_END)])]
        else:
            pairs = [(bos + enc.encode_ordinary(prompt), enc.encode_ordinary(answer))
                     for prompt, answer in render(item, meta, fewshot(items, i, meta["fewshot"]))]
        for ids, answer in pairs:
            start = len(ids)
            ids = ids + answer
            cut = max(0, len(ids) - block_size)
            out.append((i, ids[cut:], max(1, start - cut), len(ids) - cut))
    return out

# -----------------------------------------------------------------------------
# Scoring, in batches, split over processes


@torch.no_grad()
def run(m, reqs, dev, autocast, size):
    """For each request, the losses of its scored tokens and whether greedy decoding gives
    each of them, in batches of `size` sequences padded on the right (the padding is never
    scored: causal attention keeps it out of what comes before)."""
    out = []
    for b in range(0, len(reqs), size):
        chunk = reqs[b:b + size]
        ids = torch.zeros(len(chunk), max(len(r[1]) for r in chunk), dtype=torch.long)
        for row, (_, seq, _, _) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
        ids = ids.to(dev)
        with autocast:
            logits = m(ids, all_logits=True)[0].float()  # (B, T, V)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T - 1)
        right = logits[:, :-1].argmax(-1) == ids[:, 1:]
        for row, (_, _, start, end) in enumerate(chunk):  # token t is predicted at position t - 1
            out.append((losses[row, start - 1:end - 1].cpu(), bool(right[row, start - 1:end - 1].all())))
    return out


def grade(kind, gold, scored):
    """(right by the summed loss, right by the mean loss) of one item, from its sequences'
    (losses, greedy) in order. grade("choice", 1, [(tensor([1., 1., 1.]), _), (tensor([2.]), _)])
    -> (True, False): the second choice has the lower sum (2 < 3), the first the lower mean (1 < 2)."""
    if kind in ("lm", "chat"):
        return scored[0][1], scored[0][1]
    sums = [float(loss.sum()) for loss, _ in scored]
    means = [float(loss.mean()) for loss, _ in scored]
    return sums.index(min(sums)) == gold, means.index(min(means)) == gold


def evaluate(m, enc, sets, dev, autocast, items=0, size=16, rank=0, world=1):
    """Every task of every set {name: load_set(...)}: {task: {"acc", "acc_norm", "centered",
    "items"}}, and for a set of several tasks, {set: {"core": mean centered acc_norm}}.
    Under torchrun process `rank` takes every world-th item of each task; the counts are
    summed over the processes, and every process runs as many batches (FSDP's forwards
    are collective): 1 and 8 processes give the same numbers."""
    m.eval()
    results = {}
    for name, tasks in sets.items():
        for task, (meta, all_items) in tasks.items():
            chosen = all_items[:]
            random.Random(1337).shuffle(chosen)  # a fixed sample when max_items cuts it
            chosen = chosen[:items or None]
            reqs = [r for r in requests(meta, chosen, enc, m.cfg.block_size) if r[0] % world == rank]
            scored = run(m, reqs, dev, autocast, size)
            pad_batches(m, reqs, dev, autocast, size, world)
            counts = torch.zeros(3, dtype=torch.float64, device=dev)  # right by sum, right by mean, items
            for i in sorted({r[0] for r in reqs}):
                mine = [s for r, s in zip(reqs, scored) if r[0] == i]
                counts += torch.tensor([*grade(meta["kind"], chosen[i].get("gold"), mine), 1.0], device=dev)
            if world > 1:
                dist.all_reduce(counts)
            right_sum, right_mean, n = counts.tolist()
            acc, acc_norm, rand = right_sum / max(n, 1), right_mean / max(n, 1), meta["random"] / 100
            results[task] = {"acc": acc, "acc_norm": acc_norm, "centered": (acc_norm - rand) / (1 - rand),
                             "items": int(n)}
        if len(tasks) > 1:
            results[name] = {"core": sum(results[t]["centered"] for t in tasks) / len(tasks)}
    m.train()
    return results


def pad_batches(m, reqs, dev, autocast, size, world):
    """Forwards that count for nothing, so that every process runs as many as the busiest."""
    if world == 1:
        return
    batches = torch.tensor(-(-len(reqs) // size), device=dev)
    mine = int(batches)
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    for _ in range(int(batches) - mine):
        with autocast:
            m(torch.zeros(1, 2, dtype=torch.long, device=dev))


def log_row(results):
    """The results as flat keys for log.jsonl: hellaswag_acc, hellaswag_acc_norm, core, ..."""
    row = {}
    for task, r in results.items():
        if "core" in r:
            row[task] = r["core"]
        else:
            row[f"{task}_acc"], row[f"{task}_acc_norm"] = r["acc"], r["acc_norm"]
    return row


def table(results):
    """The results as a markdown table, each set's CORE last."""
    lines = ["| task | items | acc | acc_norm | centered |", "|---|---:|---:|---:|---:|"]
    for task, r in results.items():
        if "core" in r:
            lines.append(f"| **{task.upper()}** (mean centered) | | | | **{r['core']:.4f}** |")
        else:
            lines.append(f"| {task} | {r['items']:,} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {r['centered']:.4f} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------


def main():
    configure(globals())
    check_settings()
    ddp = "RANK" in os.environ  # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    dev = model.pick_device(device)
    if dev.type == "cuda" and ddp:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if rank == 0:
        prepare.prepare_evals(set_names(evals), data_dir)  # downloads and converts what is missing
    if ddp:
        dist.barrier()
    m, spec, ckpt = checkpoint.load_model(init_from, out_dir)
    amp = model.pick_dtype(dev, dtype)
    m.to(dev)
    autocast = torch.autocast(dev.type, dtype=amp) if amp != torch.float32 else torch.autocast(dev.type, enabled=False)
    sets = {name: load_set(name, data_dir) for name in set_names(evals)}
    results = evaluate(m, checkpoint.tokenizer(spec, where=init_from), sets, dev, autocast, max_items, batch, rank,
                       world)
    if rank == 0:
        what = ckpt["path"] if ckpt else init_from
        print(f"\n{what}, {amp}, {world} process(es)" + (f", {max_items} items a task at most" if max_items else ""))
        print(table(results))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, prepare.DownloadError) as e:
        raise SystemExit(f"evals.py: error: {e}") from None
