"""Explicit masks: packed documents (block-diagonal causal attention), where the GPU kernels
skip every tile the mask leaves empty. dma against SDPA with the same bool mask, dense
causal cuDNN (the cost with nothing skipped) and FlexAttention with the same mask, side by
side in one run (contenders interleaved).

    python benchmarks/bench_masks.py --seqlen 16384 --docs 16
    python benchmarks/bench_masks.py --device cpu --seqlen 1024 --docs 4 --heads 4 \\
        --kv-heads 2 --head-dim 32 --dtype float32 --contenders dma sdpa
"""

import argparse

import torch

import dma
from dma.benchmarking import (
    add_ratios,
    document_ids,
    document_mask,
    format_table,
    sdpa_contender,
    time_interleaved,
    write_csv,
)


def contenders(q, k, v, doc, names, backend):
    """name -> a maker of the function to time (forward; gradients flow if inputs need them)."""
    seqlen, group = q.shape[1], q.shape[2] // k.shape[2]
    same_doc = document_mask(doc)  # (1, 1, S, S) bool
    causal_same_doc = same_doc & torch.ones(seqlen, seqlen, dtype=torch.bool,
                                            device=q.device).tril()

    def make_dma():
        return lambda: dma.attention(q, k, v, attn_mask=same_doc, causal=True, backend=backend)

    def make_flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, i, j):
            return (doc[i] == doc[j]) & (j <= i)

        block_mask = create_block_mask(mask_mod, 1, 1, seqlen, seqlen, device=q.device)
        compiled = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: compiled(qt, kt, vt, block_mask=block_mask,
                                enable_gqa=group > 1).transpose(1, 2)

    inputs = (q, k, v, None)
    makers = {"dma": make_dma,
              "sdpa": lambda: sdpa_contender(inputs, None, attn_mask=causal_same_doc),
              "sdpa-cudnn-dense": lambda: sdpa_contender(inputs, "cudnn"),
              "flex": make_flex}
    return {name: makers[name] for name in names}


def with_backward(make, leaves):
    def make_step():
        forward = make()

        def step():
            for t in leaves:
                t.grad = None
            out = forward()
            out.backward(torch.ones_like(out))

        return step
    return make_step


def with_no_grad(make):
    return lambda: torch.no_grad()(make())


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    label = (f"B1 S{args.seqlen} H{args.heads}/{args.kv_heads} D{args.head_dim} "
             f"docs={args.docs} {args.dtype}")
    doc = document_ids(args.seqlen, args.docs, device)
    rows = []
    for mode in args.modes:
        q = rand(1, args.seqlen, args.heads, args.head_dim)
        k, v = (rand(1, args.seqlen, args.kv_heads, args.head_dim) for _ in range(2))
        leaves = [t.requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]
        makers = contenders(q, k, v, doc, args.contenders, args.backend)
        if mode == "fwd+bwd":
            timed = {n: with_backward(m, leaves) for n, m in makers.items()}
        else:
            timed = {n: with_no_grad(m) for n, m in makers.items()}
        results = time_interleaved(timed, device, warmup=2, reps=args.reps)
        rows += [dict(shape=label, contender=n, mode=mode, **results[n]) for n in makers]
    return add_ratios(rows, args.contenders[1 if len(args.contenders) > 1 else 0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--backend", default=None, help="dma backend (default: automatic)")
    parser.add_argument("--contenders", nargs="+",
                        default=["dma", "sdpa", "sdpa-cudnn-dense", "flex"] if gpu
                        else ["dma", "sdpa"],
                        help="dma, sdpa (same mask), sdpa-cudnn-dense (causal, no mask), flex"
                             " (the second one listed is the ratio baseline)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--csv", default="bench-masks.csv")
    args = parser.parse_args(argv)
    rows = run(args)
    write_csv(rows, args.csv)
    print(format_table(rows, args.contenders[1 if len(args.contenders) > 1 else 0]))
    return rows


if __name__ == "__main__":
    main()
