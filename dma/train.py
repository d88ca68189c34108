"""`python -m dma train`: small causal transformers on multi-query associative recall (MQAR).

Each sequence lists `pairs` key-value token pairs, then asks for `queries` of the keys; the
model must emit the paired value at each query. Three attention variants train side by side
on the same batches: dense causal attention, sliding-window attention (DMA layer with A frozen
at 0: equal scores keep the latest `window` keys) and DMA with the same window. With a window
shorter than the distance from a query back to its pair, only a layer that chooses which keys
to keep can recall.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from .nn import DynamicMaskAttention


def mqar_batch(batch: int, pairs: int, queries: int, vocab: int, generator, device):
    """Tokens (B, 2*pairs + queries), targets (-100 except at query positions)."""
    keys = torch.stack([torch.randperm(vocab, generator=generator)[:pairs]
                        for _ in range(batch)])
    values = torch.randint(vocab, 2 * vocab, (batch, pairs), generator=generator)
    context = torch.stack([keys, values], dim=2).reshape(batch, 2 * pairs)
    pick = torch.randint(0, pairs, (batch, queries), generator=generator)
    asked = keys.gather(1, pick)
    tokens = torch.cat([context, asked], dim=1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs:] = values.gather(1, pick)
    return tokens.to(device), targets.to(device)


class Block(nn.Module):
    def __init__(self, hidden, heads, window, backend, frozen_scores):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = DynamicMaskAttention(hidden, heads, window=window, backend=backend)
        if frozen_scores:  # sliding window: equal scores forever
            for p in (self.attn.A, *self.attn.score_proj.parameters()):
                p.requires_grad_(False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, hidden, heads, layers, window, backend, frozen_scores=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, window, backend, frozen_scores)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def attention_memory_bytes(window, seqlen, heads, batch):
    """Bytes of attention state per layer a decoder keeps: K and V cache entries held."""
    kept = seqlen if window is None else min(window, seqlen)
    return 2 * batch * heads * kept


def run(args) -> list[dict]:
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = 2 * args.vocab
    variants = {
        "dense": dict(window=None, frozen_scores=False),
        "sliding": dict(window=args.window, frozen_scores=True),
        "dma": dict(window=args.window, frozen_scores=False),
    }
    models, optims = {}, {}
    for name, kw in variants.items():
        torch.manual_seed(args.seed)
        models[name] = TinyLM(vocab, args.hidden, args.heads, args.layers, kw["window"],
                              args.backend, kw["frozen_scores"]).to(device)
        optims[name] = torch.optim.AdamW(
            [p for p in models[name].parameters() if p.requires_grad], lr=args.lr,
            weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    curves = {name: [] for name in variants}
    seconds = dict.fromkeys(variants, 0.0)
    tokens_seen = 0
    for _ in tqdm(range(args.steps), desc="training"):
        tokens, targets = mqar_batch(args.batch, args.pairs, args.queries, args.vocab,
                                     generator, device)
        tokens_seen += tokens.numel()
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(tokens)
            loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1),
                                   ignore_index=-100)
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            seconds[name] += time.perf_counter() - start
            curves[name].append(float(loss.detach()))

    rows = []
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    tokens, targets = mqar_batch(512, args.pairs, args.queries, args.vocab, eval_gen, device)
    seqlen = tokens.shape[1]
    for name, model in models.items():
        with torch.no_grad():
            logits = model(tokens)
        mask = targets != -100
        accuracy = float((logits.argmax(-1)[mask] == targets[mask]).float().mean())
        loss = float(F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)))
        rows.append(dict(variant=name, window=variants[name]["window"] or "none",
                         accuracy=accuracy, loss=loss,
                         tokens_per_s=tokens_seen / max(seconds[name], 1e-9),
                         kv_entries_per_layer=attention_memory_bytes(
                             variants[name]["window"], seqlen, args.heads, 1)))
    _plot(curves, args)
    return rows


def _plot(curves, args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'dma-attention[demo]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        smooth = torch.tensor(losses).unfold(0, min(20, len(losses)), 1).mean(1)
        ax.plot(range(len(smooth)), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (20-step mean)")
    ax.set_title(f"MQAR: {args.pairs} pairs, {args.queries} queries, window {args.window}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"learning curves: {args.plot}")


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32, help="key vocabulary (values: same)")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--plot", default="mqar.png")


def format_rows(rows) -> str:
    header = f"{'variant':8} {'window':>6} {'accuracy':>9} {'loss':>7} {'tokens/s':>10} " \
             f"{'kv entries/layer':>17}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['variant']:8} {str(r['window']):>6} {r['accuracy']:9.3f} "
                     f"{r['loss']:7.3f} {r['tokens_per_s']:10.0f} "
                     f"{r['kv_entries_per_layer']:17d}")
    return "\n".join(lines)
