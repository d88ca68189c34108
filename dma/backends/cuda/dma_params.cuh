// Arguments of every kernel, passed by value as one struct.
//
// The Python launcher (dma/backends/cupy_kernels.py) reads this file to build the matching
// host layout, so every field is 8 bytes (pointers, long long, double) and the two cannot
// drift apart. Strides are in elements; a stride of 0 reads a broadcast dim; an `_hdiv`
// field divides the query head index to get the head index of that input.
#pragma once

struct Params {
    // Tensors.
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;
    const void* dout;
    float* delta;  // written by dma_row_delta, read by dq and dk/dv
    void* dq;
    void* dk;
    void* dv;
    float* dkb;
    float* dab;
    const void* key_bias;
    const void* attn_bias;
    const void* attn_mask;
    const void* padding;
    const void* end_row;
    // Per block: the selection plan's candidate keys (DMA case), or with tile_list the live
    // tiles of an explicit mask (forward, dq: key tiles per block of plan_block rows; dk/dv:
    // row tiles per key tile), counted by candidate_count, of which full_count are listed
    // first (fully kept candidates; tiles the mask and causality allow whole).
    const void* candidates;
    const void* candidate_count;
    const void* full_count;  // with candidate_count's strides
    // Strides of q (also dq and dout), k, v, out, lse (also delta), dk/dv, dkb, dab.
    long long sq_b;
    long long sq_s;
    long long sq_h;
    long long sk_b;
    long long sk_s;
    long long sk_h;
    long long sv_b;
    long long sv_s;
    long long sv_h;
    long long so_b;
    long long so_s;
    long long so_h;
    long long slse_b;
    long long slse_h;
    long long sdk_b;
    long long sdk_s;
    long long sdk_h;
    long long sdkb_b;
    long long sdkb_h;
    long long sdab_b;
    long long sdab_h;
    long long sdab_r;
    long long sdab_c;
    long long dab_hdiv;
    // Masks and biases.
    long long skb_b;
    long long skb_h;
    long long kb_hdiv;
    long long sab_b;
    long long sab_h;
    long long sab_r;
    long long sab_c;
    long long ab_hdiv;
    long long sam_b;
    long long sam_h;
    long long sam_r;
    long long sam_c;
    long long am_hdiv;
    long long spad_b;
    // Selection plan: per-key row intervals and per-block candidate lists.
    long long splan_b;
    long long splan_h;
    long long plan_hdiv;
    long long scand_b;
    long long scand_h;
    long long scand_blk;
    long long scnt_b;
    long long scnt_h;
    long long plan_block;
    // Sizes.
    long long heads;
    long long kv_heads;
    long long group;
    long long seqlen_q;
    long long seqlen_k;
    long long causal_offset;
    long long head_dim;
    // dk/dv over candidates: rows per coarse block, programs per batch, heads per program,
    // and how many programs split one block's candidate tiles.
    long long coarse_rows;
    long long programs_per_batch;
    long long heads_per_program;
    long long key_split;
    // Feature flags (0 or 1).
    long long causal;
    long long has_kb;
    long long has_ab;
    long long has_am;
    long long has_pad;
    long long has_softcap;
    long long interval;
    long long tile_list;
    long long need_dab;
    long long need_dkb;
    long long candidate_tiles;
    long long vector_loads;
    double scale;
    double softcap;
};
