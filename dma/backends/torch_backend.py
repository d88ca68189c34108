"""Pure PyTorch backend: every feature and dtype of the SPEC, on any device torch runs on.

Query rows are processed in chunks so that peak extra memory is O(chunk x keys-in-view), never
O(Sq x Sk):

* dense chunks (no window, or the row-wise general selection) see the keys up to the chunk's
  causal limit;
* interval chunks (the DMA case) are the plan's query blocks and see only the block's
  candidate keys, gathered from K and V: work proportional to the kept pairs.

Arithmetic is float32 (float64 for float64 inputs); query heads are grouped as (Hkv, G) so
that K and V are never copied per query head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import split_heads, sum_to_heads
from ..selection import allowed_pairs, rows_and_keys, rowwise_keep
from ..validation import SELECT_ROWWISE, SUPPORTED_DTYPES, Inputs, Problem
from .base import Backend, Capabilities, new_output

# Elements of one (B, H, rows, keys) score tensor in a dense chunk; a handful of such
# temporaries are alive at once.
DENSE_CHUNK_ELEMENTS = 1 << 23


@dataclass
class _Chunk:
    """Everything one chunk of query rows needs, shared by forward and backward."""

    rows: slice
    q: torch.Tensor  # (B, Hkv, G, rows, D) compute dtype
    k: torch.Tensor  # (B, Hkv, G or 1, keys, D)
    v: torch.Tensor
    scores: torch.Tensor  # (B, Hkv, G, rows, keys), -inf where not kept
    softcap_tanh: Optional[torch.Tensor]  # tanh(t / softcap) where softcap is set
    key_index: Optional[torch.Tensor]  # (B, Hkv, G or 1, keys) gathered key ids; None = 0..keys
    key_count: int  # keys in view: a prefix of the sequence or the gathered candidates


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset(SUPPORTED_DTYPES),
        notes=("reference-grade fallback; row-chunked, O(chunk x keys) extra memory",),
    )
    block_m = 128

    # ---- shared by forward and backward -------------------------------------------------
    @staticmethod
    def _grouped(problem: Problem, inputs: Inputs):
        """q as (B, Hkv, G, Sq, D) and k, v as (B, Hkv, Sk, D), in the compute dtype."""
        dtype = torch.float64 if problem.dtype == torch.float64 else torch.float32
        q = inputs.q.transpose(1, 2).to(dtype)
        q = q.reshape(problem.batch, problem.kv_heads, problem.group_size, problem.seqlen_q, -1)
        k = inputs.k.transpose(1, 2).to(dtype)
        v = inputs.v.transpose(1, 2).to(dtype)
        return q, k, v

    @staticmethod
    def _row_chunks(problem: Problem, plan):
        if plan is not None:
            step = plan.block_m
        else:
            per_row = problem.batch * problem.heads * max(1, problem.seqlen_k)
            step = max(1, DENSE_CHUNK_ELEMENTS // per_row)
        for block, start in enumerate(range(0, problem.seqlen_q, step)):
            yield block, slice(start, min(start + step, problem.seqlen_q))

    def _chunk(self, problem, inputs, plan, q, k, v, block, rows) -> _Chunk:
        device = q.device
        row_ids = torch.arange(rows.start, rows.stop, device=device)
        q_c = q[:, :, :, rows]
        if plan is None:
            key_count = problem.seqlen_k
            if problem.causal and problem.selection != SELECT_ROWWISE:
                key_count = max(0, min(problem.seqlen_k, rows.stop + problem.causal_offset))
            k_c, v_c = k[:, :, None, :key_count], v[:, :, None, :key_count]
            key_index = None
        else:
            cand = split_heads(plan.candidates[:, :, block], problem.kv_heads, problem.heads)
            valid = cand >= 0
            key_index = cand.long().clamp(min=0)
            key_index = key_index.expand(problem.batch, problem.kv_heads, *key_index.shape[2:])
            key_count = key_index.shape[-1]
            k_c = self._gather_keys(k, key_index)
            v_c = self._gather_keys(v, key_index)

        t = problem.scale * torch.matmul(q_c, k_c.transpose(-1, -2))
        softcap_tanh = None
        if problem.softcap is not None:
            softcap_tanh = torch.tanh(t / problem.softcap)
            t = problem.softcap * softcap_tanh
        scores = t
        if inputs.key_bias is not None:
            kb = split_heads(inputs.key_bias, problem.kv_heads, problem.heads).to(t.dtype)
            kb = kb[..., :key_count] if key_index is None else self._gather_bias(kb, key_index)
            scores = scores + kb[..., None, :]
        if inputs.attn_bias is not None:  # never in the interval case
            ab = rows_and_keys(inputs.attn_bias, rows, key_count)
            scores = scores + split_heads(ab, problem.kv_heads, problem.heads).to(t.dtype)

        if plan is None:
            allowed = allowed_pairs(problem, inputs, rows, key_count)
            if problem.selection == SELECT_ROWWISE:
                allowed = rowwise_keep(problem, inputs, rows.start, rows.stop, allowed)
            keep = split_heads(allowed, problem.kv_heads, problem.heads)
        else:
            first = split_heads(plan.key_first_row, problem.kv_heads, problem.heads)
            end = split_heads(plan.key_end_row, problem.kv_heads, problem.heads)
            first = self._gather_bias(first, key_index)[..., None, :]
            end = self._gather_bias(end, key_index)[..., None, :]
            r = row_ids[:, None]
            keep = valid[..., None, :] & (r >= first) & (r < end)
        scores = scores.masked_fill(~keep, float("-inf"))
        return _Chunk(rows, q_c, k_c, v_c, scores, softcap_tanh, key_index, key_count)

    @staticmethod
    def _gather_keys(x, key_index):
        """x (B, Hkv, Sk, D) at key_index (B, Hkv, G', C) -> (B, Hkv, G', C, D)."""
        b, hkv, g, c = key_index.shape
        src = x[:, :, None].expand(b, hkv, g, *x.shape[2:])
        return torch.gather(src, 3, key_index[..., None].expand(b, hkv, g, c, x.shape[-1]))

    @staticmethod
    def _gather_bias(t, key_index):
        """t (b, hkv', g', Sk) at key_index (B, Hkv, G', C) -> (B, Hkv, G', C)."""
        return torch.gather(t.expand(*key_index.shape[:3], t.shape[-1]), 3, key_index)

    @staticmethod
    def _softmax(scores):
        """Row softmax that gives p = 0 and lse = -inf for rows with no kept key."""
        lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return torch.exp(scores - safe[..., None]), lse

    # ---- entry points --------------------------------------------------------------------
    def forward(self, problem: Problem, inputs: Inputs, plan):
        q, k, v = self._grouped(problem, inputs)
        b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
        out = new_output((b, sq, h, d), problem.dtype, problem.device)
        lse = new_output((b, h, sq), torch.float32, problem.device)
        for block, rows in self._row_chunks(problem, plan):
            chunk = self._chunk(problem, inputs, plan, q, k, v, block, rows)
            p, chunk_lse = self._softmax(chunk.scores)
            o = torch.matmul(p, chunk.v)  # (B, Hkv, G, rows, D)
            out[:, rows] = o.reshape(b, h, -1, d).transpose(1, 2).to(problem.dtype)
            lse[:, :, rows] = chunk_lse.reshape(b, h, -1).float()
        return out, lse

    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        q, k, v = self._grouped(problem, inputs)
        b, hkv, g = problem.batch, problem.kv_heads, problem.group_size
        need_q, need_k, need_v, need_kb, need_ab = problem.needs_grad
        do = do.transpose(1, 2).to(q.dtype).reshape(q.shape)
        delta = delta.to(q.dtype).reshape(b, hkv, g, -1)
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        dkb = torch.zeros(b, hkv, g, problem.seqlen_k, dtype=q.dtype, device=q.device) \
            if need_kb else None
        ab = inputs.attn_bias
        dab = torch.zeros(ab.shape, dtype=q.dtype, device=q.device) if need_ab else None

        for block, rows in self._row_chunks(problem, plan):
            c = self._chunk(problem, inputs, plan, q, k, v, block, rows)
            p, _ = self._softmax(c.scores)
            do_c = do[:, :, :, rows]
            dp = torch.matmul(do_c, c.v.transpose(-1, -2))
            ds = p * (dp - delta[..., rows, None])
            dt = ds if c.softcap_tanh is None else ds * (1 - c.softcap_tanh.square())
            if need_q:
                dq[:, :, :, rows] = problem.scale * torch.matmul(dt, c.k)
            if need_k:
                self._add_key_grad(dk, problem.scale * torch.matmul(dt.transpose(-1, -2), c.q), c)
            if need_v:
                self._add_key_grad(dv, torch.matmul(p.transpose(-1, -2), do_c), c)
            if need_kb:
                self._add_key_bias_grad(dkb, ds.sum(-2), c)
            if need_ab:
                grad = sum_to_heads(ds, ab.shape[0], ab.shape[1], hkv)
                target_rows = rows if ab.shape[2] > 1 else slice(None)
                if ab.shape[2] == 1:
                    grad = grad.sum(2, keepdim=True)
                if ab.shape[3] == 1:
                    grad = grad.sum(3, keepdim=True)
                    dab[:, :, target_rows] += grad
                else:
                    dab[:, :, target_rows, : c.key_count] += grad

        def back(t, like):
            return None if t is None else t.to(like.dtype)

        grads_q = None if dq is None else back(dq.reshape(b, -1, *dq.shape[3:]).transpose(1, 2),
                                               inputs.q)
        grads_k = None if dk is None else back(dk.transpose(1, 2), inputs.k)
        grads_v = None if dv is None else back(dv.transpose(1, 2), inputs.v)
        grads_kb = None
        if dkb is not None:
            kb = inputs.key_bias
            grads_kb = back(sum_to_heads(dkb, kb.shape[0], kb.shape[1], hkv), kb)
        return grads_q, grads_k, grads_v, grads_kb, back(dab, ab) if dab is not None else None

    @staticmethod
    def _add_key_grad(acc, contribution, chunk: _Chunk):
        """dk or dv: acc (B, Hkv, Sk, D) += contribution (B, Hkv, G, keys, D), summed over
        the query heads of each kv group."""
        if chunk.key_index is None:
            acc[:, :, : chunk.key_count] += contribution.sum(2)
            return
        if chunk.key_index.shape[2] == 1:  # the whole group shares one candidate list
            contribution = contribution.sum(2, keepdim=True)
        index = chunk.key_index.flatten(2, 3)[..., None].expand(-1, -1, -1, acc.shape[-1])
        acc.scatter_add_(2, index, contribution.flatten(2, 3))

    @staticmethod
    def _add_key_bias_grad(acc, contribution, chunk: _Chunk):
        """d key_bias: acc (B, Hkv, G, Sk) += contribution (B, Hkv, G, keys)."""
        if chunk.key_index is None:
            acc[..., : chunk.key_count] += contribution
        else:
            acc.scatter_add_(3, chunk.key_index.expand_as(contribution), contribution)
