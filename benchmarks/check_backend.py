"""Check one backend against the torch backend in float64 at sizes beyond the unit tests.

    python benchmarks/check_backend.py --backend cupy
    python benchmarks/check_backend.py --backend triton --seqlens 1000 4096

For each dtype, head dim and case (DMA window with key_bias, dense causal, explicit bias and
mask) it runs forward and backward on fresh random inputs and prints the relative error
||x - ref|| / ||ref|| of o, dq, dk, dv and the bias gradient. NaN anywhere is reported as nan.
"""

import argparse

import torch
from tqdm import tqdm

import dma


def make_case(kind, seqlen, head_dim, dtype, device, gen):
    b, h, hkv = 2, 8, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)

    q, k, v = randn(b, seqlen, h, head_dim), randn(b, seqlen, hkv, head_dim), \
        randn(b, seqlen, hkv, head_dim)
    kw = {}
    if kind == "dma":
        kw = dict(key_bias=randn(b, hkv, seqlen), window=max(16, seqlen // 5))
    elif kind == "masks":
        keep = torch.rand(1, h, seqlen, seqlen, generator=gen) > 0.3
        kw = dict(attn_bias=randn(b, 1, seqlen, seqlen), attn_mask=keep.to(device),
                  softcap=5.0)
    return (q, k, v), kw


def run(backend, tensors, kw, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    extra = {n: (t.detach().clone().requires_grad_(True) if t.is_floating_point() else t)
             for n, t in kw.items() if torch.is_tensor(t)}
    args = {**kw, **extra}
    o = dma.attention(*leaves, backend=backend, **args)
    o.backward(do.to(o.dtype))
    grads = [t.grad for t in leaves]
    bias = next((t for n, t in extra.items() if n in ("key_bias", "attn_bias")), None)
    return [o.detach()] + grads + ([bias.grad] if bias is not None else [])


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[777])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--kinds", nargs="+", default=["dma", "dense", "masks"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    combos = [(dt, d, s, kind) for dt in args.dtypes for d in args.head_dims
              for s in args.seqlens for kind in args.kinds]
    for dtype_name, d, s, kind in tqdm(combos, desc=f"checking {args.backend}"):
        dtype = getattr(torch, dtype_name)
        tensors, kw = make_case(kind, s, d, dtype, args.device, gen)
        do = torch.randn(tensors[0].shape, generator=gen).to(args.device)
        got = run(args.backend, tensors, kw, do)
        ref_kw = {n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                  for n, t in kw.items()}
        ref = run("torch", [t.double() for t in tensors], ref_kw, do.double())
        rows.append((dtype_name, d, s, kind, [rel_err(x, r) for x, r in zip(got, ref)]))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"backend {args.backend} on {card}")
    print(f"{'dtype':>9} {'D':>4} {'S':>6} {'case':>6}  o        dq       dk       dv       dbias")
    for dtype_name, d, s, kind, errs in rows:
        print(f"{dtype_name:>9} {d:>4} {s:>6} {kind:>6}  " + " ".join(f"{e:8.1e}" for e in errs))


if __name__ == "__main__":
    main()
