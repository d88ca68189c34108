"""Every rule of SPEC section 6, in one place.

`validate` checks the user's arguments and condenses them into a frozen, backend-neutral
`Problem`: sizes, dtype, device, how each bias and mask broadcasts, the causal offset, which
selection rule applies and which inputs need gradients. Backends trust a `Problem` and never
re-validate.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Selection rules (SPEC section 3), decided once per call.
SELECT_NONE = "none"  # no window (or a window that keeps every allowed key): K_i = A_i
SELECT_INTERVAL = "interval"  # key_bias ranks keys, masks do not vary by row: O(Sk) plan
SELECT_ROWWISE = "rowwise"  # window with attn_bias or a row-varying mask: dense top-w per row


class Inputs(NamedTuple):
    """The tensors of one call, after validation (None where absent)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_bias: Optional[torch.Tensor]
    attn_bias: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    key_padding_mask: Optional[torch.Tensor]


class Broadcast(NamedTuple):
    """Sizes of a bias or mask that broadcasts to (B, H, Sq, Sk): each is 1 or full.

    `heads` is 1, Hkv or H; query head h reads head h // (H // heads).
    """

    batch: int
    heads: int
    rows: int
    keys: int


class Problem(NamedTuple):
    """One call's sizes and options, condensed. Immutable; a NamedTuple rather than a frozen
    dataclass because every call builds one, and that is about 5x cheaper to construct."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    softcap: Optional[float]
    causal: bool
    window: Optional[int]
    key_bias: Optional[Broadcast]  # rows == keys-sized view: (batch, heads, 1, Sk)
    attn_bias: Optional[Broadcast]
    attn_mask: Optional[Broadcast]
    key_padding: bool
    selection: str
    needs_grad: tuple  # (q, k, v, key_bias, attn_bias)
    return_lse: bool

    @property
    def causal_offset(self) -> int:
        """Row i may see key j when j <= i + causal_offset (bottom-right alignment)."""
        return self.seqlen_k - self.seqlen_q

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def is_empty(self) -> bool:
        return self.batch == 0 or self.seqlen_q == 0 or self.seqlen_k == 0 or self.heads == 0

    @property
    def any_grad(self) -> bool:
        return any(self.needs_grad)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _type_name(x) -> str:
    """`x`'s type as a user would write it: `int`, `numpy.int64`, `torch.Tensor`."""
    kind = type(x)
    module = kind.__module__.split(".")[0]
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(t)}")
    return t


def _check_bias_like(name, t, batch, heads, kv_heads, seqlen_q, seqlen_k) -> Broadcast:
    """A tensor broadcastable to (B, H, Sq, Sk): rank 4, each dim 1 or full, heads 1/Hkv/H."""
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dims broadcastable to (B, H, Sq, Sk) = "
            f"({batch}, {heads}, {seqlen_q}, {seqlen_k}); got {_describe(t)}"
        )
    b, h, r, c = t.shape
    ok = (
        b in (1, batch)
        and h in (1, kv_heads, heads)
        and r in (1, seqlen_q)
        and c in (1, seqlen_k)
    )
    if not ok:
        raise ValueError(
            f"{name} does not broadcast to (B, H, Sq, Sk) = ({batch}, {heads}, {seqlen_q}, "
            f"{seqlen_k}): each dim must be 1 or full, the head dim 1, Hkv={kv_heads} or "
            f"H={heads}; got {_describe(t)}"
        )
    return Broadcast(batch=b, heads=h, rows=r, keys=c)


def validate(
    q,
    k,
    v,
    *,
    key_bias=None,
    window=None,
    attn_bias=None,
    attn_mask=None,
    key_padding_mask=None,
    causal=False,
    scale=None,
    softcap=None,
    return_lse=False,
) -> tuple[Problem, Inputs]:
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            layout = "(B, Sq, H, D)" if name == "q" else "(B, Sk, Hkv, D)"
            raise ValueError(f"{name} must have 4 dims {layout}; got {_describe(t)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    batch, seqlen_q, heads, head_dim = q.shape
    _, seqlen_k, kv_heads, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape (B={batch}, Sk, Hkv, D={head_dim}) to match q; got {_describe(k)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {_describe(v)}")
    if kv_heads == 0 and heads != 0 or kv_heads and heads % kv_heads != 0:
        raise ValueError(
            f"q's head count H={heads} must be a multiple of k's head count Hkv={kv_heads}"
        )
    if head_dim == 0:
        raise ValueError(f"head dim D must be at least 1; got q {_describe(q)}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {_type_name(causal)}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {_type_name(return_lse)}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int >= 1 or None; got {_type_name(window)}")
        if window < 1:
            raise ValueError(f"window must be >= 1; got {window}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None; got {_type_name(scale)}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite; got {scale}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float > 0 or None; got {_type_name(softcap)}")
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be a finite float > 0; got {softcap}")

    def same_place(name, t, *, boolean):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
        if boolean and t.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor (True = may attend); got {t.dtype}")
        if not boolean and t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")

    key_bias_bc = None
    if key_bias is not None:
        key_bias = _require_tensor("key_bias", key_bias)
        same_place("key_bias", key_bias, boolean=False)
        if (
            key_bias.dim() != 3
            or key_bias.shape[0] not in (1, batch)
            or key_bias.shape[1] not in (1, kv_heads, heads)
            or key_bias.shape[2] != seqlen_k
        ):
            raise ValueError(
                f"key_bias must have shape (B or 1, Hb, Sk) with B={batch}, Hb in "
                f"{{1, {kv_heads}, {heads}}}, Sk={seqlen_k}; got {_describe(key_bias)}"
            )
        key_bias_bc = Broadcast(key_bias.shape[0], key_bias.shape[1], 1, seqlen_k)

    attn_bias_bc = None
    if attn_bias is not None:
        attn_bias = _require_tensor("attn_bias", attn_bias)
        same_place("attn_bias", attn_bias, boolean=False)
        attn_bias_bc = _check_bias_like(
            "attn_bias", attn_bias, batch, heads, kv_heads, seqlen_q, seqlen_k
        )

    attn_mask_bc = None
    if attn_mask is not None:
        attn_mask = _require_tensor("attn_mask", attn_mask)
        same_place("attn_mask", attn_mask, boolean=True)
        attn_mask_bc = _check_bias_like(
            "attn_mask", attn_mask, batch, heads, kv_heads, seqlen_q, seqlen_k
        )

    if key_padding_mask is not None:
        key_padding_mask = _require_tensor("key_padding_mask", key_padding_mask)
        same_place("key_padding_mask", key_padding_mask, boolean=True)
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(
                f"key_padding_mask must have shape (B, Sk) = ({batch}, {seqlen_k}); "
                f"got {_describe(key_padding_mask)}"
            )

    # Which selection rule applies (SPEC section 3). A window that can hold every key
    # keeps all allowed keys, so it is the same as no window.
    if window is None or window >= seqlen_k:
        selection = SELECT_NONE
    elif attn_bias is None and (attn_mask_bc is None or attn_mask_bc.rows == 1):
        selection = SELECT_INTERVAL
    else:
        selection = SELECT_ROWWISE

    grad_enabled = torch.is_grad_enabled()

    def wants_grad(t):
        return bool(grad_enabled and t is not None and t.requires_grad)

    problem = Problem(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=q.dtype,
        device=q.device,
        scale=scale,
        softcap=softcap,
        causal=causal,
        window=window,
        key_bias=key_bias_bc,
        attn_bias=attn_bias_bc,
        attn_mask=attn_mask_bc,
        key_padding=key_padding_mask is not None,
        selection=selection,
        needs_grad=tuple(wants_grad(t) for t in (q, k, v, key_bias, attn_bias)),
        return_lse=return_lse,
    )
    inputs = Inputs(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask)
    return problem, inputs
