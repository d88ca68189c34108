"""The interval plan against a brute-force per-row selection, and its bounds."""

import os

import pytest
import torch

import dma
from dma.selection import SORT_BY_MERGING, TRITON_SORTS, build_interval_plan
from dma.validation import validate


def brute_force_keep(kb, allowed, sq, sk, w, causal):
    keep = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        limit = i + sk - sq if causal else sk - 1
        cands = [j for j in range(sk) if j <= limit and allowed[j]]
        cands.sort(key=lambda j: (kb[j].item(), j), reverse=True)
        keep[i, cands[:w]] = True
    return keep


def _plan_kernel_device() -> str:
    """Where the triton plan kernels run: a GPU, or the CPU under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("plan kernels need CUDA or TRITON_INTERPRET=1 (the triton nox session)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _full_first_parts(plan) -> torch.Tensor:
    """A full-first plan's candidate lists with each part (fully kept keys, then the others)
    sorted: the order within a part is free (IntervalPlan.candidates)."""
    candidates = plan.candidates.cpu().long()
    slots = torch.arange(candidates.shape[-1])
    n_full = plan.full_count.cpu().long()[..., None]
    count = plan.candidate_count.cpu().long()[..., None]
    part = torch.where(slots < n_full, 0, torch.where(slots < count, 1, 2))
    # Sort by (part, key): keys are below 2^31, padding (-1, part 2) stays last.
    return torch.sort(part * 2**32 + candidates, dim=-1).values


def _assert_same_plans(expected, plan):
    for name in ("key_first_row", "key_end_row", "candidate_count", "full_count"):
        assert torch.equal(getattr(expected, name).cpu(), getattr(plan, name).cpu()), name
    assert torch.equal(_full_first_parts(expected), _full_first_parts(plan)), "candidates"


@pytest.mark.parametrize("engine", ["torch", "triton", "numba"])
@pytest.mark.parametrize("seed", range(60))
def test_interval_plan_matches_brute_force(seed, engine):
    check_plan_against_brute_force(seed, engine)


@pytest.mark.parametrize("engine", ["torch", "triton", "numba"])
@pytest.mark.parametrize("seed", range(20))
def test_single_row_plan_matches_brute_force(seed, engine):
    """Decoding (Sq == 1) takes its own path: the first w keys of one sort."""
    check_plan_against_brute_force(seed, engine, seqlen_q=1)


def check_plan_against_brute_force(seed, engine, seqlen_q=None):
    if engine == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("plan kernels need CUDA or TRITON_INTERPRET=1 (the triton nox session)")
    if engine == "numba":
        pytest.importorskip("numba")
    g = torch.Generator().manual_seed(seed)
    sq = int(torch.randint(1, 40, (), generator=g)) if seqlen_q is None else seqlen_q
    sk = int(torch.randint(2, 40, (), generator=g))
    w = int(torch.randint(1, sk, (), generator=g))
    causal = bool(seed % 3)
    b = 2
    if seed % 2:
        kb = torch.randint(0, 4, (b, 1, sk), generator=g).float()  # many ties
    else:
        kb = torch.randn(b, 1, sk, generator=g)
    if seed % 4 == 0:
        kb = kb.half()  # the plan compares half key_bias as float32
    pad = torch.rand(b, sk, generator=g) > 0.2
    if seed % 5 == 0:
        pad[:] = True  # and passed as no mask at all
    device = "cuda" if engine == "triton" and torch.cuda.is_available() else "cpu"
    kb, pad = kb.to(device), pad.to(device)
    q = torch.randn(b, sq, 2, 8, device=device, dtype=kb.dtype)
    k = torch.randn(b, sk, 1, 8, device=device, dtype=kb.dtype)
    problem, inputs = validate(q, k, k, key_bias=kb, window=w, causal=causal,
                               key_padding_mask=None if seed % 5 == 0 else pad)
    assert problem.selection == "interval"
    block_m = 2 ** int(torch.randint(0, 4, (), generator=g))  # kernels need powers of two
    full_first = (seed // 2) % 2 == 1
    plan = build_interval_plan(problem, inputs, block_m, engine=engine, full_first=full_first)
    rows = torch.arange(sq)[:, None]
    plan = type(plan)(*(t.cpu() if torch.is_tensor(t) else t for t in plan.__dict__.values()))
    kb, pad = kb.cpu(), pad.cpu()
    for bi in range(b):
        expected = brute_force_keep(kb[bi, 0].float(), pad[bi], sq, sk, w, causal)
        first, end = plan.key_first_row[bi, 0].long(), plan.key_end_row[bi, 0].long()
        assert torch.equal((rows >= first) & (rows < end), expected)
        # The triton kernels test rows against each key's causal start rather than
        # key_first_row (triton_kernels._key_terms): a kept key is kept from the first row
        # that sees it, and a key that no row keeps has an empty interval from there too.
        start = (torch.arange(sk) - (sk - sq)).clamp(min=0) if causal else 0 * first
        assert torch.equal((rows >= start) & (rows < end), expected)
        for block in range(plan.candidates.shape[2]):
            count = int(plan.candidate_count[bi, 0, block])
            listed = plan.candidates[bi, 0, block, :count].tolist()
            block_keep = expected[block * block_m:(block + 1) * block_m]
            by_any = block_keep.any(0).nonzero().flatten().tolist()
            by_all = block_keep.all(0).nonzero().flatten().tolist()
            n_full = int(plan.full_count[bi, 0, block])
            if full_first or sq == 1:  # every row keeps the first n_full, listed first
                assert n_full == len(by_all)  # in any order within each part
                assert sorted(listed[:n_full]) == by_all
                assert sorted(listed[n_full:]) == [j for j in by_any if j not in by_all]
            else:
                assert n_full == 0 and listed == by_any
            assert count <= w + block_m
            assert (plan.candidates[bi, 0, block, count:] == -1).all()


def test_sliding_window_equivalence():
    """No bias (or equal key_bias) with window=w and causal is sliding-window attention."""
    torch.manual_seed(0)
    b, s, h, d, w = 2, 40, 2, 16, 7
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    band = (j <= i) & (j > i - w)
    expected = dma.attention(q, k, v, attn_mask=band[None, None], backend="torch")
    for kb in (None, torch.full((1, 1, s), 0.5)):
        got = dma.attention(q, k, v, key_bias=kb, window=w, causal=True, backend="torch")
        torch.testing.assert_close(got, expected)


def test_window_selection_is_causal():
    """Changing future keys never changes which past keys a row keeps (SPEC section 3)."""
    torch.manual_seed(1)
    b, s, h, d, w = 1, 32, 1, 8, 5
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    kb = torch.randn(b, h, s)
    o = dma.attention(q, k, v, key_bias=kb, window=w, causal=True, backend="torch")
    kb2 = kb.clone()
    kb2[..., 20:] += 100.0  # future keys become the best ones
    o2 = dma.attention(q, k, v, key_bias=kb2, window=w, causal=True, backend="torch")
    torch.testing.assert_close(o[:, :20], o2[:, :20], rtol=0, atol=0)


@pytest.mark.parametrize("window,scores", [(700, "ties"), (2600, "ties"), (1500, "normal"),
                                           (1500, "half"), (700, "half ties"),
                                           (1500, "bfloat16"), (700, "bfloat16 ties")])
def test_single_row_triton_plan_over_many_key_chunks(window, scores):
    """The decoding plan's radix select and compaction span several 1024-key chunks: the
    triton engine must give the torch engine's plan (checked above against brute force),
    padding and ties (which straddle chunks) included; "normal" scores need all three digit
    levels, 16-bit ones take two (their ties are told by the second digit alone), and
    "half" ones go without a padding mask."""
    device = _plan_kernel_device()
    if device == "cpu" and scores.startswith("bfloat16"):
        pytest.skip("the Triton interpreter cannot load bfloat16")
    g = torch.Generator().manual_seed(window)
    sk = 3000
    kb = torch.randint(0, 50, (2, 1, sk), generator=g).float()
    if not scores.endswith("ties"):
        kb = torch.randn(2, 1, sk, generator=g)
    if scores.startswith("half"):
        kb = kb.half()
    if scores.startswith("bfloat16"):
        kb = kb.bfloat16()
    pad = (torch.rand(2, sk, generator=g) > 0.1).to(device)
    q = torch.randn(2, 1, 2, 8, device=device, dtype=kb.dtype)
    k = torch.randn(2, sk, 1, 8, device=device, dtype=kb.dtype)
    problem, inputs = validate(q, k, k, key_bias=kb.to(device), window=window, causal=True,
                               key_padding_mask=None if scores == "half" else pad)
    plans = [build_interval_plan(problem, inputs, 64, engine=e) for e in ("torch", "triton")]
    _assert_same_plans(*plans)


@pytest.mark.parametrize("case", [
    dict(sq=2500, sk=2500, window=300, block_m=64, causal=True, per_program=3),
    dict(sq=2500, sk=2500, window=300, block_m=128, causal=True, per_program=16, pad=True),
    dict(sq=700, sk=2500, window=900, block_m=64, causal=True, per_program=4, ties=True),
    dict(sq=1300, sk=2100, window=100, block_m=16, causal=True, per_program=7, pad=True),
    dict(sq=600, sk=2500, window=400, block_m=64, causal=False, per_program=5, pad=True),
    dict(sq=1100, sk=1100, window=1000, block_m=128, causal=True, per_program=2, ties=True),
    dict(sq=9000, sk=9000, window=500, block_m=128, causal=True, per_program=8),
    # one block per program, each first row's kept keys found best first over two or three
    # chunks of the order (fewer than the keys it sees)
    dict(sq=3000, sk=6000, window=1500, block_m=128, causal=True, per_program=1, pad=True,
         ties=True),
    # bfloat16 scores past SORT_BY_MERGING keys: torch's sort takes int16 keys
    dict(sq=600, sk=SORT_BY_MERGING + 616, window=700, block_m=64, causal=True, per_program=4,
         ties=True, dtype=torch.bfloat16),
    dict(sq=5000, sk=5000, window=300, block_m=64, causal=True, per_program=3, pad=True,
         dtype=torch.bfloat16),
])
def test_multi_row_triton_plan_over_many_key_chunks(case, monkeypatch):
    """The plan kernels at sizes the brute-force test cannot reach: thresholds whose rank
    windows and candidate scans span several 1024-key chunks (at 9000 keys the early blocks'
    coarse count passes whole chunks of the order first), and candidate programs that serve
    several consecutive blocks (each derived from the one before). The triton engine
    must give the torch engine's plan, the same keys in each full-first part."""
    device = _plan_kernel_device()
    if device == "cpu" and case.get("dtype") == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot load bfloat16")
    import dma.selection as selection

    monkeypatch.setattr(selection, "candidate_blocks_per_program",
                        lambda *args: case["per_program"])
    sq, sk = case["sq"], case["sk"]
    g = torch.Generator().manual_seed(sq + sk + case["window"])
    if case.get("ties"):
        kb = torch.randint(0, 30, (1, 1, sk), generator=g).float()
    else:
        kb = torch.randn(1, 1, sk, generator=g)
    kb = kb.to(case.get("dtype", torch.float32))
    pad = None
    if case.get("pad"):
        pad = (torch.rand(1, sk, generator=g) > 0.15).to(device)
    q = torch.randn(1, sq, 2, 8, device=device, dtype=kb.dtype)
    k = torch.randn(1, sk, 1, 8, device=device, dtype=kb.dtype)
    problem, inputs = validate(q, k, k, key_bias=kb.to(device), window=case["window"],
                               causal=case["causal"], key_padding_mask=pad)
    plans = [build_interval_plan(problem, inputs, case["block_m"], engine=e, full_first=True)
             for e in ("torch", "triton")]
    assert int(plans[0].candidate_count.max()) > 0
    _assert_same_plans(*plans)


@pytest.mark.parametrize("sort", TRITON_SORTS)
@pytest.mark.parametrize("sk,dtype", [(1500, torch.float32), (1024, torch.float16),
                                      (700, torch.bfloat16), (3000, torch.bfloat16),
                                      (12000, torch.bfloat16)])
def test_triton_sorts_order_keys_best_first(sort, sk, dtype):
    """Every sort path of the triton plan gives the same best-first order: allowed keys by
    (score, index) descending, then the disallowed ones, later keys first. The merge meets
    6 to 8 chunks, with padding in the last one (not at 1024 keys), many ties, and key 0
    disallowed (it packs as the padding value). 12000 keys (chunks of 2048, as rows of up to
    SORT_BY_MERGING keys take them) are bfloat16, so GPU only: the interpreter would take
    minutes over them."""
    device = _plan_kernel_device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot load bfloat16")
    import dma.selection as selection

    g = torch.Generator().manual_seed(sk)
    scores = torch.randint(-20, 20, (3, sk), generator=g).to(dtype)
    scores[1] = torch.randn(sk, generator=g).to(dtype)
    allowed = torch.rand(3, sk, generator=g) > 0.2
    allowed[0] = True  # first: a padding entry written past its row would land in the next
    allowed[1:, 0] = False
    expected = torch.tensor([
        sorted(range(sk), reverse=True,
               key=lambda j: (bool(allowed[r, j]), float(scores[r, j]) if allowed[r, j] else 0, j))
        for r in range(3)], dtype=torch.int32)
    q = torch.randn(1, 40, 3, 8, device=device, dtype=dtype)
    problem, _ = validate(q, q, q, window=16, causal=True)
    *_, order, _, n_allowed = selection._key_intervals_triton(
        problem, scores.to(device), allowed.to(device), sort=sort)
    assert torch.equal(order.cpu(), expected)
    assert torch.equal(n_allowed.cpu(), allowed.sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("rows,chunk", [(16, 256), (64, 1024), (128, 512)])
def test_triton_thresholds_do_not_depend_on_their_launch_shape(rows, chunk, monkeypatch):
    """The row-threshold kernel's rows per program and scan step are tuning only: any of
    them must give the torch engine's plan (ties and padding included), with the window
    smaller and larger than a program's rows."""
    device = _plan_kernel_device()
    import dma.selection as selection

    monkeypatch.setattr(selection, "THRESHOLD_ROWS", rows)
    monkeypatch.setattr(selection, "THRESHOLD_CHUNK", chunk)
    g = torch.Generator().manual_seed(rows)
    sk = 1500
    kb = torch.randint(0, 40, (1, 1, sk), generator=g).float()
    pad = (torch.rand(1, sk, generator=g) > 0.1).to(device)
    q = torch.randn(1, 400, 2, 8, device=device)
    k = torch.randn(1, sk, 1, 8, device=device)
    for window in (100, 600):
        problem, inputs = validate(q, k, k, key_bias=kb.to(device), window=window,
                                   causal=True, key_padding_mask=pad)
        plans = [build_interval_plan(problem, inputs, 64, engine=e, full_first=True)
                 for e in ("torch", "triton")]
        _assert_same_plans(*plans)
