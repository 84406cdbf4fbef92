"""Self-supervised adaptation of the default model (issue 12): contrastive fine-tuning of its top layers.

Pairs (a section title -> the first prose paragraphs under it) are mined from the reST sources of the
**training half** of ../shared/data/pydocs.jsonl (the documents are split in two by a seeded shuffle
of their sorted ids: ``pydocs_split``; the other half is kept for evaluation, and the FAQ pages, the
source of pyfaq_qa.jsonl, are not in pydocs at all). The default model (all-MiniLM-L6-v2 converted
as ``longdoc`` converts it; inputs of at most ``--max-tokens`` tokens, full attention, mean pooling)
is trained with in-batch negatives (MultipleNegativesRanking-style, symmetric, similarity scale 20 =
the scale the model was trained with), only its top ``--layers`` layers trainable (the frozen
layers' outputs are computed once, in eval mode). What is saved is the difference of those layers'
weights from the source, in fp16 (``--out``, a safetensors file that ``longdoc_cli.hub.apply_delta``
adds to the converted default model; the query/key/value delta also goes to the global
projections, which the conversion copies from the local ones).

Reproducible: fixed seeds for the split, the pair order and torch; one thread by default.

    OMP_NUM_THREADS=1 python benchmarks/adapt_default.py --out /tmp/adapt/delta.safetensors \\
        [--steps 200] [--layers 2] [--lr 3e-5] [--batch 32] [--save-every 50]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLIT_SEED = 12


def pydocs_split(ids: list[str], seed: int = SPLIT_SEED) -> tuple[set[str], set[str]]:
    """(training ids, evaluation ids): the sorted ids shuffled with ``seed``, first half for training."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return set(order[:half]), set(order[half:])


_ADORNMENT = re.compile(r"([=\-~^\"'*+#`:.])\1{2,}")
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)?:`~?!?([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")
_NAMED = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``([^`]*)``")
_EMPH = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")


def clean_rst(text: str) -> str:
    """Plain words out of inline reST markup (roles, links, literals, emphasis), one line."""
    text = _ROLE.sub(lambda m: re.sub(r"\s*<[^>]*>$", "", m.group(1)), text)
    text = _LINK.sub(r"\1", text)
    text = _NAMED.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = re.sub(r"::$", ":", text.strip())
    return " ".join(text.split())


def _prose(par: list[str]) -> bool:
    first = par[0]
    if first[:1].isspace() or first.lstrip().startswith(("..", ">>>", "|", "+", "=", ":", "*", "-", "#")):
        return False
    words = " ".join(par).split()
    letters = sum(c.isalpha() for c in " ".join(par))
    return len(words) >= 8 and letters >= 0.6 * len(" ".join(par))


def mine_pairs(text: str, max_chars: int = 700) -> list[tuple[str, str]]:
    """(title, passage) pairs of a reST document: each section title with the first prose
    paragraphs under it (up to ``max_chars``), markup removed; sections without prose give none."""
    lines = text.split("\n")
    titles = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip()
        and not _ADORNMENT.fullmatch(lines[i].strip())
        and not lines[i].startswith((" ", "\t", ".."))
        and _ADORNMENT.fullmatch(lines[i + 1].strip())
        and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 2
    ]
    pairs = []
    for n, i in enumerate(titles):
        end = titles[n + 1] - 1 if n + 1 < len(titles) else len(lines)
        body = lines[i + 2 : end]
        pars, cur = [], []
        for line in [*body, ""]:
            if line.strip():
                cur.append(line)
            elif cur:
                pars.append(cur)
                cur = []
        passage = ""
        for par in pars:
            if not _prose(par):
                if passage:
                    break
                continue
            passage = (passage + " " + clean_rst(" ".join(par))).strip()
            if len(passage) >= max_chars // 2:
                break
        title = clean_rst(lines[i])
        if passage and sum(c.isalpha() for c in title) >= 3:
            pairs.append((title, passage[:max_chars]))
    return pairs


def training_pairs(path: Path, seed: int = SPLIT_SEED) -> tuple[list[tuple[str, str]], set[str]]:
    """The pairs of the training half (a title seen in more than one place is dropped: "Examples"
    says nothing of its section, and its copies would be false in-batch negatives); and its ids."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train, _ = pydocs_split([r["id"] for r in records], seed)
    pairs = [p for r in records if r["id"] in train for p in mine_pairs(r["text"])]
    counts = Counter(t.lower() for t, _ in pairs)
    return [(t, p) for t, p in pairs if counts[t.lower()] == 1], train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "pydocs.jsonl"))
    ap.add_argument("--out", required=True, help="the delta file (safetensors); checkpoints beside it")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2, help="train the top N layers")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    import tempfile

    from safetensors.torch import save_file

    from longdoc_cli.attention import global_indices
    from longdoc_cli.convert import convert_checkpoint
    from longdoc_cli.hub import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS, default_source_dir
    from longdoc_cli.model import AttentionMasks, LongformerEncoder
    from longdoc_cli.tokenize import DocumentTokenizer

    pairs, train_ids = training_pairs(Path(args.data))
    random.Random(args.seed).shuffle(pairs)
    print(f"{len(pairs)} pairs from {len(train_ids)} training documents", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the default model as longdoc converts it (no delta)
        model_dir = convert_checkpoint(
            default_source_dir(), Path(tmp) / "m", DEFAULT_MAX_POSITIONS, DEFAULT_ATTENTION_WINDOW
        )
        model = LongformerEncoder.from_pretrained(model_dir)
        tok = DocumentTokenizer.from_dir(model_dir)
    n_layers = model.config.num_hidden_layers
    first_trained = n_layers - args.layers
    top = [f"encoder.layer.{i}." for i in range(first_trained, n_layers)]
    # The global projections get no gradient here (no global tokens): apply_delta gives them the
    # local projections' delta, as the conversion made them copies of the local ones.
    trained = lambda k: k.startswith(tuple(top)) and "_global." not in k  # noqa: E731
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if trained(k)}
    for name, p in model.named_parameters():
        p.requires_grad = trained(name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup)))
    )

    def masks_of(real: torch.Tensor) -> AttentionMasks:
        glob = torch.zeros_like(real)  # no global tokens: inputs this short are full attention
        return AttentionMasks(real, glob, *global_indices(glob))

    def batches(ids: list[list[int]], size: int):
        for s in range(0, len(ids), size):
            chunk = ids[s : s + size]
            T = max(map(len, chunk))
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            real = torch.zeros(len(chunk), T, dtype=torch.bool)
            for i, row in enumerate(chunk):
                x[i, : len(row)] = torch.tensor(row)
                real[i, : len(row)] = True
            yield x, real

    # The frozen lower layers are run once per text (in eval mode, no dropout): their output is the
    # trained layers' input at every step, so a step runs only the top layers.
    texts = sorted({t for pair in pairs for t in pair})
    ids = [[tok.cls_id, *tok.encode(t).ids[: args.max_tokens - 2], tok.sep_id] for t in texts]
    lower: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for n, (x, real) in enumerate(batches(ids, 32)):
            h = model.embeddings(x)
            masks = masks_of(real)
            for layer in model.encoder.layer[:first_trained]:
                h = layer(h, masks)
            for i in range(x.shape[0]):
                k = n * 32 + i
                lower[texts[k]] = h[i, : len(ids[k])].clone()
    print(f"lower layers of {len(texts)} texts: {time.perf_counter() - t0:.0f} s", flush=True)

    def embed(batch_texts: list[str]) -> torch.Tensor:
        states = [lower[t] for t in batch_texts]
        T = max(len(h) for h in states)
        h = torch.zeros(len(states), T, states[0].shape[-1])
        real = torch.zeros(len(states), T, dtype=torch.bool)
        for i, st in enumerate(states):
            h[i, : len(st)] = st
            real[i, : len(st)] = True
        masks = masks_of(real)
        for layer in model.encoder.layer[first_trained:]:
            h = layer(h, masks)
        m = real.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # mean over real tokens

    def save(path: Path, step: int) -> None:
        state = model.state_dict()
        delta = {k: (state[k] - v).to(torch.float16).contiguous() for k, v in base.items()}
        meta = {"format": "pt", "step": str(step), "layers": str(args.layers), "lr": str(args.lr),
                "batch": str(args.batch), "seed": str(args.seed), "max_tokens": str(args.max_tokens),
                "pairs": str(len(pairs)), "source": "pydocs training half (benchmarks/adapt_default.py)",
                "pairs_sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(delta, str(path), metadata=meta)
        print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)

    out = Path(args.out)
    model.train()
    t0, pos, losses = time.perf_counter(), 0, []
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(pairs):
            random.Random(args.seed + step).shuffle(pairs)
            pos = 0
        batch = pairs[pos : pos + args.batch]
        pos += args.batch
        q = embed([t for t, _ in batch])
        p = embed([x for _, x in batch])
        sim = 20.0 * q @ p.T
        target = torch.arange(len(batch))
        loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step} loss {sum(losses[-10:]) / 10:.4f} "
                  f"({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)  # fmt: skip
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            save(out.with_name(f"{out.stem}-step{step}{out.suffix}"), step)
    save(out, args.steps)


if __name__ == "__main__":
    main()
