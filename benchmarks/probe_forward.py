"""How fast a plain Triton attention forward runs on this GPU, beside dma's forward.

    python benchmarks/probe_forward.py                       # 16k tokens, window 2048
    python benchmarks/probe_forward.py --dma-trials '{"BLOCK_N": 128, "num_warps": 8}'

A calibration, not a contender: a minimal forward (no key_bias, no plan, no masks beyond
causal) over every query block's last `window` keys, in three ways of reading K/V tiles:
consecutive rows through pointers, consecutive rows through tensor descriptors (TMA), and
rows gathered through an index list (a random permutation of the keys, as scattered as
dma's candidates). Its time per computed pair, set beside dma's forward on the same shape
and cuDNN's dense causal forward, says how much of dma's forward time is the gather, how
much the tile shape, and how much dma's own per-pair work (key_bias, the keep test, the
lazy rescale). `--dma-trials` times dma's forward with other launch settings too.
"""

import argparse
import json

import torch
import triton
import triton.language as tl

import dma
from dma.backends import triton_backend
from dma.benchmarking import Shape, back_to_back_ms, make_inputs

LOG2E = 1.4426950408889634


def probe_scale(dim: int) -> float:
    """The probe's score scale, 1 / sqrt(dim) in base 2 (its scores go straight to exp2)."""
    return LOG2E / dim ** 0.5


@triton.jit
def _probe_tile(m_i, l_i, acc, q, rows, start, K, V, KB, FIRST, k_desc, v_desc, IDX, kv_base,
                last_key, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, READ: tl.constexpr,
                CAUSAL_TILE: tl.constexpr, KEY_BIAS: tl.constexpr, TEST: tl.constexpr,
                ROW_SUMS_ON_MMA: tl.constexpr, LAZY: tl.constexpr):
    """One key tile into the online softmax. READ: 0 pointers to consecutive rows,
    1 tensor descriptors, 2 pointers to rows gathered through IDX. The rest are dma's
    per-pair extras, to price them one by one: KEY_BIAS adds a per-key bias, 1: loaded as
    float32 and added, 2: three bfloat16 parts added by the matrix unit; TEST
    loads each key's first row and tests it in every tile (the diagonal tiles keep their
    causal test too); ROW_SUMS_ON_MMA sums p on the matrix unit (l_i is (rows, 16));
    LAZY rescales only when some row's max grew by more than 8 (base 2)."""
    keys = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    rows_read = tl.minimum(keys, last_key)  # a diagonal tile wider than the block ends late
    if READ == 1:
        k = k_desc.load([kv_base + start, 0])
    else:
        if READ == 2:
            rows_read = tl.load(IDX + kv_base + rows_read)
        k = tl.load(K + (kv_base + rows_read)[:, None] * D + dims[None, :])
    qk = tl.dot(q, tl.trans(k))
    if KEY_BIAS == 2:
        # the bias as three bfloat16 parts (16 columns per key, 3 used) times a ones tile,
        # added by the matrix unit
        kb_parts = tl.load(KB + (kv_base + rows_read)[:, None] * 16 + tl.arange(0, 16)[None, :])
        ones = tl.where(tl.arange(0, 16) < 3, 1.0, 0.0).to(q.dtype)
        qk = tl.dot(tl.broadcast_to(ones[None, :], (q.shape[0], 16)), tl.trans(kb_parts), qk)
    qk = qk * qk_scale
    if KEY_BIAS == 1:
        qk += tl.load(KB + kv_base + rows_read)[None, :]
    if TEST:
        first = tl.load(FIRST + kv_base + rows_read)
        qk = tl.where(rows[:, None] >= first[None, :], qk, float("-inf"))
    if CAUSAL_TILE:  # also drops the clamped slots past the last key
        qk = tl.where(keys[None, :] <= rows[:, None], qk, float("-inf"))
    m_tile = tl.max(qk, 1)
    if LAZY:
        moved = m_tile > m_i + 8.0
        m_new = tl.where(moved, m_tile, m_i)
    else:
        m_new = tl.maximum(m_i, m_tile)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    if LAZY:
        if tl.max(moved.to(tl.int32), 0) > 0:
            l_i = l_i * alpha[:, None]
            acc = acc * alpha[:, None]
    else:
        l_i = l_i * alpha[:, None]
        acc = acc * alpha[:, None]
    if READ == 1:
        v = v_desc.load([kv_base + start, 0])
    else:
        v = tl.load(V + (kv_base + rows_read)[:, None] * D + dims[None, :])
    p_in = p.to(v.dtype)
    if ROW_SUMS_ON_MMA:
        l_i = tl.dot(p_in, tl.full([BLOCK_N, 16], 1.0, v.dtype), l_i)
    else:
        l_i += tl.sum(p, 1)[:, None]
    acc = tl.dot(p_in, v, acc)
    return m_new, l_i, acc


@triton.jit
def _probe_kernel(Q, K, V, KB, FIRST, Out, IDX, k_desc, v_desc, seqlen, window, qk_scale,
                  GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, READ: tl.constexpr, STACK: tl.constexpr,
                  KEY_BIAS: tl.constexpr, TEST: tl.constexpr, ROW_SUMS_ON_MMA: tl.constexpr,
                  LAZY: tl.constexpr):
    """Query block program_id(0) (last to first) of STACK heads of one kv group (program_id
    (1) over head groups), stacked into one tile as dma's forward does, against keys
    [block start - window, block end), causal on the block's own keys. Q and Out are
    (heads, seq, D), K and V (kv heads, seq, D), contiguous."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1) * STACK
    kv_base = (h // GROUP) * seqlen
    tile = tl.arange(0, STACK * BLOCK_M)
    rows = block * BLOCK_M + tile % BLOCK_M
    row_base = (h + tile // BLOCK_M) * seqlen + rows
    dims = tl.arange(0, D)
    q = tl.load(Q + row_base[:, None] * D + dims[None, :])
    m_i = tl.full([STACK * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([STACK * BLOCK_M, 16 if ROW_SUMS_ON_MMA else 1], tl.float32)
    acc = tl.zeros([STACK * BLOCK_M, D], tl.float32)
    diagonal = block * BLOCK_M
    first_key = tl.maximum(diagonal - window, 0)
    tested = first_key + (diagonal - first_key) // BLOCK_N * BLOCK_N  # first tested tile
    for start in range(first_key, tested, BLOCK_N):
        m_i, l_i, acc = _probe_tile(m_i, l_i, acc, q, rows, start, K, V, KB, FIRST, k_desc,
                                    v_desc, IDX, kv_base, seqlen - 1, qk_scale, D, BLOCK_N, READ,
                                    False,
                                    KEY_BIAS, TEST, ROW_SUMS_ON_MMA, LAZY)
    for start in range(tested, diagonal + BLOCK_M, BLOCK_N):
        m_i, l_i, acc = _probe_tile(m_i, l_i, acc, q, rows, start, K, V, KB, FIRST, k_desc,
                                    v_desc, IDX, kv_base, seqlen - 1, qk_scale, D, BLOCK_N, READ,
                                    True,
                                    KEY_BIAS, TEST, ROW_SUMS_ON_MMA, LAZY)
    out = acc / tl.max(l_i, 1)[:, None]
    tl.store(Out + row_base[:, None] * D + dims[None, :], out.to(Out.dtype.element_ty))


def probe(q, k, v, window: int, config: dict, index=None, key_bias=None, first=None):
    """Launch the probe; q (heads, seq, D), k and v (kv heads, seq, D), contiguous;
    key_bias (kv heads, seq) float32 in log2 units (KEY_BIAS=2: its `bias_parts`) and first
    (kv heads, seq) int32 (each key's first row, in the order of the rows read) where the
    config asks for them."""
    config = dict(PROBE_DEFAULTS, **config)
    heads, seqlen, dim = q.shape
    kv_heads = k.shape[0]
    out = torch.empty_like(q)
    k_desc = v_desc = None
    if config["READ"] == 1:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k.view(-1, dim), [config["BLOCK_N"], dim])
        v_desc = TensorDescriptor.from_tensor(v.view(-1, dim), [config["BLOCK_N"], dim])
    grid = (seqlen // config["BLOCK_M"], heads // config["STACK"])
    unused = k
    _probe_kernel[grid](q, k, v, unused if key_bias is None else key_bias,
                        unused if first is None else first, out,
                        unused if index is None else index, k_desc, v_desc, seqlen, window,
                        probe_scale(dim), GROUP=heads // kv_heads, D=dim, **config)
    return out


def bias_parts(key_bias, qk_scale: float):
    """(kv heads, seq, 16) bfloat16: key_bias / qk_scale as the sum of three bfloat16 parts
    (columns 0-2; exact for float32), the rest 0."""
    rest = key_bias / qk_scale
    parts = torch.zeros(*key_bias.shape, 16, device=key_bias.device, dtype=torch.bfloat16)
    for column in range(3):
        parts[..., column] = rest.to(torch.bfloat16)
        rest = rest - parts[..., column].float()
    return parts


PROBE_DEFAULTS = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, READ=0, STACK=1,
                      KEY_BIAS=0, TEST=False, ROW_SUMS_ON_MMA=False, LAZY=False)


def probe_reference(q, k, v, window: int, block_m: int, key_bias=None):
    """The probe's result in float32: each block's rows see keys [block start - window,
    row] (GQA by repeating the kv heads); key_bias in log2 units, as the probe takes it."""
    heads, seqlen, dim = q.shape
    group = heads // k.shape[0]
    kf, vf = (t.float().repeat_interleave(group, 0) for t in (k, v))
    scores = q.float() @ kf.transpose(1, 2) / dim ** 0.5
    if key_bias is not None:
        scores = scores + key_bias.repeat_interleave(group, 0)[:, None, :] / LOG2E
    rows = torch.arange(seqlen, device=q.device)[:, None]
    keys = torch.arange(seqlen, device=q.device)[None, :]
    block_start = rows // block_m * block_m
    keep = (keys <= rows) & (keys >= block_start - window)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ vf


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--probes", nargs="*", type=json.loads, default=None,
                        help="probe settings to time (JSON objects over PROBE_DEFAULTS); "
                             "default: a list that prices dma's extras one by one")
    parser.add_argument("--dma-trials", nargs="*", type=json.loads, default=[],
                        help="dma forward launch settings to time, JSON objects over the defaults")
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = Shape(1, args.seqlen, 32, 8, 128, args.window, torch.bfloat16)
    q4, k4, v4, kb = make_inputs(shape, device)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q4, k4, v4))
    index = torch.stack([torch.randperm(args.seqlen, device=device)
                         for _ in range(k.shape[0])]).to(torch.int32).contiguous()
    rows = []

    def timed(name, fn, pairs=None):
        fn()  # compiles
        ms = back_to_back_ms(fn, device, args.reps)
        tflops = 4 * 128 * pairs * 32 / ms / 1e9 if pairs else float("nan")
        rows.append((name, ms, tflops))
        print(f"{name:90s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s", flush=True)

    key_bias = torch.randn(k.shape[:2], device=device)  # float32, log2 units
    first = torch.arange(args.seqlen, device=device, dtype=torch.int32).repeat(k.shape[0], 1)
    gathered = dict(READ=2)
    dma_like = dict(gathered, BLOCK_M=64, STACK=2, KEY_BIAS=1, TEST=True, LAZY=True)
    configs = args.probes if args.probes is not None else [
        dict(), dict(READ=1), gathered, dict(gathered, BLOCK_N=64),
        dict(gathered, KEY_BIAS=1), dict(gathered, KEY_BIAS=2), dict(gathered, TEST=True),
        dict(gathered, ROW_SUMS_ON_MMA=True), dict(gathered, LAZY=True),
        dict(gathered, BLOCK_M=64, STACK=2), dma_like, dict(dma_like, LAZY=False),
        dict(dma_like, BLOCK_N=32, num_warps=4, ROW_SUMS_ON_MMA=True),
        dict(gathered, BLOCK_N=32, num_warps=4),
    ]
    # each setting is first checked on a short prefix, gathered through the identity
    small_len = 512
    small = [t[:, :small_len].contiguous() for t in (q, k, v)]
    small_bias = key_bias[:, :small_len].contiguous()
    small_first = first[:, :small_len].contiguous()
    small_index = first[:, :small_len].contiguous()
    for config in configs:
        full = dict(PROBE_DEFAULTS, **config)
        name = "probe " + " ".join(f"{key}={value}" for key, value in config.items())
        try:
            bias_in, small_bias_in = key_bias, small_bias
            if full["KEY_BIAS"] == 2:
                bias_in, small_bias_in = (bias_parts(t, probe_scale(q.shape[-1]))
                                          for t in (key_bias, small_bias))
            got = probe(*small, args.window, config, small_index, small_bias_in, small_first)
            want = probe_reference(*small, args.window, full["BLOCK_M"],
                                   small_bias if full["KEY_BIAS"] else None)
            err = (got.float() - want).abs().max().item()
            pairs = sum(min(b * full["BLOCK_M"], args.window) + full["BLOCK_M"]
                        for b in range(args.seqlen // full["BLOCK_M"])) * full["BLOCK_M"]
            timed(f"{name} (err {err:.1e})",
                  lambda config=config, bias_in=bias_in: probe(
                      q, k, v, args.window, config, index, bias_in, first), pairs)
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile or fit
            print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)

    dma_pairs = sum(min(b * 64, args.window) + 64 for b in range(args.seqlen // 64)) * 64
    first_out = None
    for trial in [{}] + args.dma_trials:
        triton_backend.OVERRIDES["fwd"] = trial

        def forward():
            with torch.no_grad():
                return dma.attention(q4, k4, v4, key_bias=kb, window=args.window, causal=True,
                                     backend="triton")

        out = forward()
        first_out = out if first_out is None else first_out
        diff = (out.float() - first_out.float()).abs().max().item()
        timed(f"dma forward {json.dumps(trial)} (max diff to the first {diff:.1e})", forward,
              dma_pairs)
    triton_backend.OVERRIDES.pop("fwd", None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qd, kd, vd = (t.transpose(1, 2) for t in (q4, k4.repeat_interleave(4, 2),
                                             v4.repeat_interleave(4, 2)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        timed("cuDNN dense causal", lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True), args.seqlen * (args.seqlen + 1) // 2)
    print("\nname | ms | TFLOP/s (computed pairs)")
    for name, ms, tflops in rows:
        print(f"{name} | {ms:.3f} | {tflops:.0f}")


if __name__ == "__main__":
    main()
