"""Per-kernel GPU time of one dma forward+backward (torch.profiler), to see where time goes.

    python benchmarks/profile_kernels.py --seqlen 16384 --window 2048
    python benchmarks/profile_kernels.py --seqlen 131072 --seqlen-q 1 --forward-only
    python benchmarks/profile_kernels.py --seqlen 4096 --forward-only --timeline
    python benchmarks/profile_kernels.py --seqlen 16384 --docs 16   # explicit mask

`--docs N` profiles the explicit-mask path instead: N packed documents, a block-diagonal
`attn_mask` with causality and no window (bench_masks.py's case).

`--timeline` lists, for one call issued to an idle device, every GPU operation in order:
when the host launched it and when the GPU ran it, in us from the call's start. The GPU's
idle time before a kernel that was launched late is host time the call pays in full.
"""

import argparse
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import dma
from dma.benchmarking import Shape, document_ids, document_mask, make_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--seqlen-q", type=int, default=None, help="query rows (default: seqlen)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--docs", type=int, default=0,
                        help="packed documents as an attn_mask instead of key_bias and window")
    parser.add_argument("--timeline", action="store_true",
                        help="host launch and GPU run times of one call's operations")
    args = parser.parse_args()
    shape = Shape(1, args.seqlen, args.heads, args.kv_heads, args.head_dim, args.window,
                  torch.bfloat16, seqlen_q=args.seqlen_q)
    q, k, v, kb = make_inputs(shape, "cuda")
    for t in (q, k, v, kb):
        t.requires_grad_(not args.forward_only)

    selection = dict(key_bias=kb, window=args.window)
    if args.docs:
        selection = dict(attn_mask=document_mask(document_ids(args.seqlen, args.docs, q.device)))

    leaves = [t for t in (q, k, v, kb) if t.requires_grad]
    do = torch.ones_like(q)

    def step():
        o = dma.attention(q, k, v, **selection, causal=True, backend=args.backend)
        if not args.forward_only:
            # autograd.grad: the gradients are returned, not added into .grad, so the profile
            # holds dma's backward alone (no accumulation kernels)
            torch.autograd.grad(o, leaves, do, allow_unused=True)

    step()
    torch.cuda.synchronize()
    if args.timeline:
        print_timeline(step)
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


def print_timeline(step):
    """One call under the profiler (CPU and CUDA), its GPU operations in launch order."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        with torch.profiler.record_function("call"):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    call = next(e for e in events if e["name"] == "call" and e.get("cat") == "user_annotation")
    t0, t_end = call["ts"], call["ts"] + call["dur"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                 key=lambda e: e["ts"])
    print(f"{'operation':48s} {'launched':>9s} {'start':>9s} {'end':>9s} {'idle before':>11s}")
    previous_end = t0
    for e in gpu:
        launch = launches.get(e["args"].get("correlation"))
        launched = f"{launch['ts'] - t0:9.1f}" if launch else f"{'':9s}"
        idle = max(0.0, e["ts"] - previous_end)
        print(f"{e['name'][:48]:48s} {launched} {e['ts'] - t0:9.1f} "
              f"{e['ts'] + e['dur'] - t0:9.1f} {idle:11.1f}")
        previous_end = max(previous_end, e["ts"] + e["dur"])
    busy = sum(e["dur"] for e in gpu)
    print(f"host returned at {t_end - t0:.1f} us; GPU done at {previous_end - t0:.1f} us; "
          f"GPU busy {busy:.1f} us")


if __name__ == "__main__":
    main()
