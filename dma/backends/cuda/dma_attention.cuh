// CUDA kernels of the cupy backend: the twins of triton_kernels.py, walking the same tiles.
//
// * forward and dq: one program per (query block of BLOCK_M rows, batch x head); warp w owns
//   WARP_M rows from WARP_M * w (16 in dq, 16 or 32 in the forward) and walks key tiles of
//   BLOCK_N keys: the block's candidate keys from the selection plan, gathered from K and V
//   (DMA case, p.interval), the live tiles of an explicit mask listed per block (p.tile_list;
//   tiles whose mask is all false are never visited), or consecutive keys, with masks and
//   biases applied per element (broadcast dims read at stride 0). Each tile picks its keep
//   test (with_keep_test).
// * dk/dv: one program per tile of keys, warp w owning keys 16w..16w+15, walking the query
//   row tiles that may keep them (under an explicit mask, the live ones listed per key tile).
//   Two modes, as in the triton backend: consecutive keys with one writer per output element
//   (deterministic; dense case), or the candidate keys of a coarse block of rows, added with
//   float32 atomics (DMA case, default).
//
// Scores go through masked_score (dma_common.cuh); softmax runs in base 2 with the
// natural-log lse stored for the SPEC. Shared tiles are rows of D_PAD + SMEM_PAD elements.
#pragma once
#include "dma_common.cuh"
#include "dma_wgmma.cuh"

// Programs per multiprocessor that the registers must allow (occupancy against spills; tuned
// for bf16, head dim 128; forwards with 32-row warps need two, for 255 registers). Override
// with -D in DMA_CUPY_OPTIONS to experiment.
#ifndef DMA_FORWARD_MIN_BLOCKS
#define DMA_FORWARD_MIN_BLOCKS 3
#endif
#ifndef DMA_DQ_MIN_BLOCKS
#define DMA_DQ_MIN_BLOCKS 2
#endif

// The ids and facts of one tile's keys, staged into shared memory by the first BLOCK_N
// threads in two steps: `fetch` issues the global loads early, `publish` stores them later,
// so their latency hides behind the current tile's products.
template <class E, int BLOCK_N>
struct TileKeys {
    int id;
    KeyFacts facts;

    DMA_DEVICE void fetch(const Params& p, const ScoreInputs<E>& in, const int* list,
                          long long start, long long n_slots) {
        if (threadIdx.x < BLOCK_N) {
            id = key_tile_id<BLOCK_N>(p, list, start, threadIdx.x, n_slots);
            facts = key_facts(in, id);
        }
    }
    DMA_DEVICE void publish(int* ids, KeyFacts* all) const {
        if (threadIdx.x < BLOCK_N) {
            ids[threadIdx.x] = id;
            all[threadIdx.x] = facts;
        }
    }
};

// What a forward or dq program works on: the BLOCK_M query rows from row0 of head h (the
// last block runs first: it has the most keys), its kv head's K and V, and the key slots its
// tiles walk: n_slots of them (named by `list`, or consecutive when null), the first n_full
// kept by every row.
template <class E, int BLOCK_M, int BLOCK_N>
struct QueryBlock {
    typedef typename E::T T;
    long long row0, b, h;
    ScoreInputs<E> in;
    const T* k;
    const T* v;
    long long q_off;  // of Q, dO and dq (which share q's strides)
    long long n_slots, n_full;
    const int* list;

    DMA_DEVICE explicit QueryBlock(const Params& p)
        : row0(last_first_block() * BLOCK_M), b(blockIdx.y / p.heads), h(blockIdx.y % p.heads),
          in(p, b, h),
          k(static_cast<const T*>(p.k) + b * p.sk_b + (h / p.group) * p.sk_h),
          v(static_cast<const T*>(p.v) + b * p.sv_b + (h / p.group) * p.sv_h),
          q_off(b * p.sq_b + h * p.sq_h),
          n_slots(tile_count<BLOCK_N>(p, b, h, row0, BLOCK_M)),
          n_full(full_tile_slots<BLOCK_N>(p, b, h, row0)),
          list(query_block_list(p, b, h, row0)) {}
};

// Scores of one warp's WARP_M x BLOCK_N tile (base 2) in place of its products s, and each
// row's maximum; tile_max starts at -inf.
template <class E, int MF, int NT, class Test>
DMA_DEVICE void forward_scores(float (&s)[MF][NT][4], float (&tile_max)[MF][2],
                               const ScoreInputs<E>& in, int row_w, const KeyFacts* facts) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
        tile_max[mf][0] = tile_max[mf][1] = neg_inf();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float th;
                s[mf][nt][e] = masked_score<E, Test>(in, row_w + 16 * mf + frag_row(e),
                                                     facts[frag_col(nt, e)], s[mf][nt][e], th);
                tile_max[mf][e >> 1] = fmaxf(tile_max[mf][e >> 1], s[mf][nt][e]);
            }
    }
}

// How far (in base 2) a row's scores may rise above the forward's running max before it
// moves: p stays below 2^8.
constexpr float RESCALE_SLACK = 8.f;

// One tile of the forward's online softmax, in two steps so that the warpgroup forward can
// take the first while a product still accumulates into o:
// * softmax_probabilities, on a warp's scores s (base 2) and their rows' maxima: s becomes
//   p = exp2(s - m) and l gains p's row sums. When the running max m moves, l is rescaled to
//   it and the call returns true with o's factors in alpha;
// * rescale_output then applies them to o.
// The rescale is lazy: the running max m moves (and o, l are rescaled to it) only when some
// row of the warp gains more than RESCALE_SLACK on it; until then p = exp2(s - m) stays
// below 2^RESCALE_SLACK, harmless in float32 and in the 16-bit p of the product. o and l
// share m, so o / l and lse are exact either way.
template <int MF, int NT>
DMA_DEVICE bool softmax_probabilities(float (&s)[MF][NT][4], float (&tile_max)[MF][2],
                                      float (&m)[MF][2], float (&l)[MF][2],
                                      float (&alpha)[MF][2]) {
    bool grows = false;
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[mf][r] = quad_max(tile_max[mf][r]);
            grows |= tile_max[mf][r] > m[mf][r] + RESCALE_SLACK;
        }
    const bool moves = __any_sync(0xffffffffu, grows);  // warp-uniform
    if (moves) {
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(m[mf][r], tile_max[mf][r]);
                alpha[mf][r] = m_new == neg_inf() ? 1.f : fast_exp2(m[mf][r] - m_new);
                m[mf][r] = m_new;
                l[mf][r] *= alpha[mf][r];
            }
    }
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
        // Rows that kept nothing so far have m = -inf and s = -inf: p = exp2(-inf) = 0.
        const float m_safe[2] = {m[mf][0] == neg_inf() ? 0.f : m[mf][0],
                                 m[mf][1] == neg_inf() ? 0.f : m[mf][1]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[mf][nt][e] = fast_exp2(s[mf][nt][e] - m_safe[e >> 1]);  // p
                l[mf][e >> 1] += s[mf][nt][e];
            }
    }
    return moves;
}

template <int MF, int DT>
DMA_DEVICE void rescale_output(float (&o)[MF][DT][4], const float (&alpha)[MF][2]) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mf][dt][e] *= alpha[mf][e >> 1];
}

template <int MF, int NT, int DT>
DMA_DEVICE void online_softmax(float (&s)[MF][NT][4], float (&tile_max)[MF][2],
                               float (&m)[MF][2], float (&l)[MF][2], float (&o)[MF][DT][4]) {
    float alpha[MF][2];
    if (softmax_probabilities(s, tile_max, m, l, alpha)) rescale_output(o, alpha);
}

// The forward's outputs of a warp's rows (from row_w, MF fragments of 16): o / l, and the
// natural-log lse of the base-2 running max and sum; empty rows (l = 0) write 0 and -inf.
template <class E, int MF, int DT>
DMA_DEVICE void store_forward_rows(const Params& p, long long b, long long h, int row_w,
                                   const float (&o)[MF][DT][4], float (&m)[MF][2],
                                   float (&l)[MF][2]) {
    typename E::T* out = static_cast<typename E::T*>(p.out) + b * p.so_b + h * p.so_h;
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
        l[mf][0] = quad_sum(l[mf][0]);
        l[mf][1] = quad_sum(l[mf][1]);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const long long row = row_w + 16 * mf + frag_row(e);
                const int d = frag_col(dt, e);
                const float denom = l[mf][e >> 1] == 0.f ? 1.f : l[mf][e >> 1];
                if (row < p.seqlen_q && d < p.head_dim)
                    out[row * p.so_s + d] = E::from_f32(o[mf][dt][e] / denom);
            }
        if ((threadIdx.x & 3) == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const long long row = row_w + 16 * mf + frag_row(2 * r);
                if (row < p.seqlen_q)
                    p.lse[b * p.slse_b + h * p.slse_h + row] =
                        l[mf][r] == 0.f ? neg_inf() : (m[mf][r] + log2f(l[mf][r])) * LN2;
            }
        }
    }
}

// Key tiles are single-buffered and software-pipelined: V(i) is copied while the scores of
// tile i are computed, K(i + 1) while tile i's probabilities multiply V(i); the ids and facts
// of tile i + 1 (two buffers) are fetched meanwhile. Two barriers per tile. A warp owns
// WARP_M rows: 32 (two fragments sharing every K and V fragment they read) where its
// accumulators fit in registers, else 16.
template <class E, int D_PAD, int BLOCK_M, int BLOCK_N, int WARP_M, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK_M / WARP_M * 32,
                                  WARP_M == 16 ? DMA_FORWARD_MIN_BLOCKS : 2)
    dma_forward(const Params p) {
    typedef typename E::T T;
    constexpr int THREADS = BLOCK_M / WARP_M * 32, MF = WARP_M / 16;
    constexpr int LD = D_PAD + SMEM_PAD, LDP = BLOCK_N + SMEM_PAD;
    constexpr int DT = D_PAD / 8, NT = BLOCK_N / 8;
    static_assert(THREADS >= BLOCK_N, "one thread per key of a tile stages its ids");
    extern __shared__ __align__(16) unsigned char smem[];
    T* q_s = reinterpret_cast<T*>(smem);
    T* k_s = q_s + BLOCK_M * LD;
    T* v_s = k_s + BLOCK_N * LD;
    T* p_s = v_s + BLOCK_N * LD;  // float32 only: p on its way to the product
    __shared__ int key_ids[2][BLOCK_N];
    __shared__ KeyFacts facts[2][BLOCK_N];

    const int warp = threadIdx.x / 32;
    const QueryBlock<E, BLOCK_M, BLOCK_N> blk(p);
    const ScoreInputs<E>& in = blk.in;
    const T* q_w = q_s + warp * WARP_M * LD;
    T* p_w = p_s + warp * WARP_M * LDP;
    const int row_w = (int)blk.row0 + warp * WARP_M;

    float o[MF][DT][4];
    zero(o);
    float m[MF][2], l[MF][2];
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) m[mf][0] = m[mf][1] = neg_inf(), l[mf][0] = l[mf][1] = 0.f;
    TileKeys<E, BLOCK_N> next;
    next.fetch(p, in, blk.list, 0, blk.n_slots);
    next.publish(key_ids[0], facts[0]);
    load_tile<E, BLOCK_M, D_PAD, THREADS, false>(
        q_s, static_cast<const T*>(p.q) + blk.q_off, p.sq_s, nullptr, blk.row0,
        p.seqlen_q, p);
    __syncthreads();  // tile 0's ids
    if (blk.n_slots > 0)
        load_tile<E, BLOCK_N, D_PAD, THREADS, false>(k_s, blk.k, p.sk_s, key_ids[0], 0, 0, p);
    for (long long start = 0, tile = 0; start < blk.n_slots; start += BLOCK_N, ++tile) {
        const int cur = tile & 1;
        cp_async_wait<0>();
        __syncthreads();  // K(i) and Q landed; every warp is done with V(i - 1)
        load_tile<E, BLOCK_N, D_PAD, THREADS, false>(v_s, blk.v, p.sv_s, key_ids[cur], 0, 0, p);
        const bool more = start + BLOCK_N < blk.n_slots;
        if (more) next.fetch(p, in, blk.list, start + BLOCK_N, blk.n_slots);

        float s[MF][NT][4];
        zero(s);
        warp_mma<E, D_PAD, NT, true, true, MF>(s, q_w, LD, k_s, LD);
        float tile_max[MF][2];
        with_keep_test<SOFTCAP, false>(in, start + BLOCK_N <= blk.n_full, [&](auto test) {
            forward_scores<E, MF, NT, decltype(test)>(s, tile_max, in, row_w, facts[cur]);
        });
        online_softmax(s, tile_max, m, l, o);
        if (more) next.publish(key_ids[cur ^ 1], facts[cur ^ 1]);
        cp_async_wait<0>();
        __syncthreads();  // V(i) landed; every warp is done with K(i); tile i + 1's ids
        if (more)
            load_tile<E, BLOCK_N, D_PAD, THREADS, false>(k_s, blk.k, p.sk_s, key_ids[cur ^ 1], 0,
                                                         0, p);
        warp_mma_scores<E, NT, DT, false, MF>(o, s, p_w, LDP, v_s, LD);
    }
    cp_async_wait<0>();  // nothing left in flight when no tile ran

    store_forward_rows<E>(p, blk.b, blk.h, row_w, o, m, l);
}

// The forward on Hopper's warpgroup products (sm_90a; bf16 and fp16 at head dims 64 and 128,
// rows of whole 16-byte vectors): the same tiles, tests and online softmax as dma_forward,
// on 128-row blocks and key tiles of BLOCK_N keys, split between three warpgroups:
// * a producer (warpgroup 0) copies Q once, then each tile's K and V rows (cp.async into
//   swizzled shared tiles, dma_wgmma.cuh; FORWARD_STAGES buffers each) and stages its keys'
//   facts, and announces each buffer on its barrier when the copies land. It keeps few
//   registers (PRODUCER_REGISTERS), so that
// * two consumers (warpgroups 1 and 2, 64 query rows each) can hold o, a score tile and the
//   packed P without spilling. They never wait for each other: each waits for the tiles it
//   needs and hands every buffer back once it is done with it, so no barrier of the whole
//   block stands in the loop, and the consumers issue no copies and no key loads.
// * A consumer runs FlashAttention-3's order: iteration i issues tile i + 1's S = Q K^T and
//   tile i's O += P V back to back, scores tile i + 1 and takes its probabilities while
//   P V(i) still runs, then rescales o and packs tile i + 1's P once P V(i) is done. So K
//   runs one tile ahead of V, and the producer copies in that order: K(0), then K(i + 1)
//   and V(i) for each i.
// The warpgroup dq and dk/dv below have the same three warpgroups.
constexpr int WGMMA_BLOCK_M = 128;
constexpr int WGMMA_PRODUCER_THREADS = 384;  // a producer and two consumer warpgroups
// Registers per thread after the split: within the 168 x 384 the block starts with.
constexpr int PRODUCER_REGISTERS = 56, CONSUMER_REGISTERS = 224;
// Arrivals that complete a buffer's barriers: each producer thread's copies (plus one per
// producer warp where it stages facts beside them: full); each consumer warp's (free).
constexpr unsigned PRODUCER_THREADS = 128, PRODUCER_WARPS = 4, CONSUMER_WARPS = 8;
constexpr int FORWARD_STAGES = 2;

template <class E, int D_PAD, int BLOCK_N, bool SOFTCAP>
__global__ void __launch_bounds__(WGMMA_PRODUCER_THREADS, 1) dma_forward_wgmma(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef typename E::T T;
    constexpr int BLOCK_M = WGMMA_BLOCK_M, S = FORWARD_STAGES;
    constexpr int DT = D_PAD / 8, NT = BLOCK_N / 8;
    constexpr unsigned Q_BYTES = BLOCK_M * D_PAD * 2, KV_BYTES = BLOCK_N * D_PAD * 2;
    static_assert(BLOCK_N == 128, "one producer thread per key of a tile");
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned q_s = swizzled_tiles(smem);
    const unsigned k_s = q_s + Q_BYTES, v_s = k_s + S * KV_BYTES;  // S buffers each
    __shared__ KeyFacts facts[S][BLOCK_N];  // staged with K
    __shared__ __align__(8) BufferBarriers q_bar, k_bars[S], v_bars[S];

    const int group = warpgroup_index();
    const QueryBlock<E, BLOCK_M, BLOCK_N> blk(p);
    const ScoreInputs<E>& in = blk.in;
    const int head_dim = (int)p.head_dim;
    const long long n_tiles = (blk.n_slots + BLOCK_N - 1) / BLOCK_N;
    auto parity = [](long long t) { return use_parity(t, S); };

    if (threadIdx.x == 0) {
        init_buffer(q_bar, PRODUCER_THREADS, CONSUMER_WARPS);
        for (int i = 0; i < S; ++i) {
            init_buffer(k_bars[i], PRODUCER_THREADS + PRODUCER_WARPS, CONSUMER_WARPS);
            init_buffer(v_bars[i], PRODUCER_THREADS, CONSUMER_WARPS);
        }
    }
    __syncthreads();  // the barriers exist before anyone arrives or waits

    if (group == 0) {
        // Producer: thread i handles row i of every tile (its id, its key's facts).
        warpgroup_registers_down<PRODUCER_REGISTERS>();
        const int row = (int)threadIdx.x;
        const long long q_row = blk.row0 + row;
        copy_rows_of_lanes<E, BLOCK_M, D_PAD>(q_s, static_cast<const T*>(p.q) + blk.q_off,
                                              p.sq_s, q_row < p.seqlen_q ? (int)q_row : -1,
                                              head_dim);
        mbarrier_arrive_on_copies(shared_address(&q_bar.full));
        auto key_id = [&](long long t) {
            return key_tile_id<BLOCK_N>(p, blk.list, t * BLOCK_N, row, blk.n_slots);
        };
        // id: the key of this row in tile t; v_id: in tile t - 1 (V runs a tile behind K).
        int id = n_tiles > 0 ? key_id(0) : -1, v_id = -1;
        for (long long t = 0; t <= n_tiles; ++t) {
            const int next_id = t + 1 < n_tiles ? key_id(t + 1) : -1;  // loads early
            if (t < n_tiles) {  // K(t) and its facts
                const BufferBarriers& bar = k_bars[t % S];
                wait_until_free(bar, parity(t));
                copy_rows_of_lanes<E, BLOCK_N, D_PAD>(k_s + (t % S) * KV_BYTES, blk.k, p.sk_s,
                                                      id, head_dim);
                mbarrier_arrive_on_copies(shared_address(&bar.full));
                facts[t % S][row] = key_facts(in, id);
                warp_arrive(bar);
            }
            if (t > 0) {  // V(t - 1)
                const BufferBarriers& bar = v_bars[(t - 1) % S];
                wait_until_free(bar, parity(t - 1));
                copy_rows_of_lanes<E, BLOCK_N, D_PAD>(v_s + ((t - 1) % S) * KV_BYTES, blk.v,
                                                      p.sv_s, v_id, head_dim);
                mbarrier_arrive_on_copies(shared_address(&bar.full));
            }
            v_id = id;
            id = next_id;
        }
        cp_async_wait<0>();  // nothing in flight when the block ends
        return;
    }

    // Consumers: warpgroup `group` (1 or 2) owns rows 64 (group - 1) on.
    warpgroup_registers_up<CONSUMER_REGISTERS>();
    const int consumer = group - 1, warp = (int)threadIdx.x / 32 - 4;
    const int row_w = (int)blk.row0 + warp * 16;

    // s: one score tile, the product's output, scored and turned into p in place.
    float o[1][DT][4], s[1][NT][4], tile_max[1][2], alpha[1][2];
    unsigned pa[BLOCK_N / 16][4];  // p packed: the A operand of P V
    zero(o);
    zero(s);  // defined inputs for the first product, which overwrites them
    float m[1][2] = {{neg_inf(), neg_inf()}}, l[1][2] = {{0.f, 0.f}};

    // s = Q K(t)^T for the group's 64 rows.
    auto issue_scores = [&](long long t) {
        wgmma_fence();
        wgmma_rows_by_rows<E, D_PAD, BLOCK_M, BLOCK_N>(s[0], q_s, consumer * 64,
                                                       k_s + (t % S) * KV_BYTES);
        wgmma_commit();
    };
    // O += P V(t), P from pa.
    auto issue_pv = [&](long long t) {
        wgmma_fence();
        wgmma_registers_by_rows<E, D_PAD, BLOCK_N>(o[0], pa, v_s + (t % S) * KV_BYTES);
        wgmma_commit();
    };
    // Tile t's scores and probabilities in s, from its product; returns whether o must be
    // rescaled by alpha. Hands K(t) and its facts back.
    auto probabilities = [&](long long t) {
        with_keep_test<SOFTCAP, true>(in, (t + 1) * BLOCK_N <= blk.n_full, [&](auto test) {
            forward_scores<E, 1, NT, decltype(test)>(s, tile_max, in, row_w, facts[t % S]);
        });
        hand_back(k_bars[t % S]);
        return softmax_probabilities(s, tile_max, m, l, alpha);
    };

    if (n_tiles > 0) {
        wait_for_copies(q_bar, 0);
        wait_for_copies(k_bars[0], 0);
        issue_scores(0);
        wgmma_wait<0>();
        hold_accumulator(s[0]);
        probabilities(0);  // o is still zero: nothing to rescale
        pack_operand<E>(pa, s[0]);
    }
    // Every tile but the last; the products are issued on every path (a product issued under
    // a condition makes the compiler serialise them all).
    for (long long t = 0; t + 1 < n_tiles; ++t) {
        wait_for_copies(k_bars[(t + 1) % S], parity(t + 1));
        wait_for_copies(v_bars[t % S], parity(t));
        issue_scores(t + 1);
        issue_pv(t);
        wgmma_wait<1>();  // tile t + 1's scores while P V(t) runs
        hold_accumulator(s[0]);
        const bool rescale = probabilities(t + 1);
        wgmma_wait<0>();
        hold_accumulator(o[0]);
        hand_back(v_bars[t % S]);
        if (rescale) rescale_output(o, alpha);
        pack_operand<E>(pa, s[0]);
    }
    if (n_tiles > 0) {
        wait_for_copies(v_bars[(n_tiles - 1) % S], parity(n_tiles - 1));
        issue_pv(n_tiles - 1);
        wgmma_wait<0>();
        hold_accumulator(o[0]);
    }
    store_forward_rows<E>(p, blk.b, blk.h, row_w, o, m, l);
#else
    __trap();  // compiled for another target: the launcher never runs it there
#endif
}

// The backward's first step: delta = rowsum(dO * O) in float32, into p.delta (strides of
// lse), O at p.out (strides so_*) and dO at p.dout (strides sq_*), last dims contiguous.
// One warp per row, each input read once (in torch it takes two casts, a product and a sum
// over float32 copies of O and dO).
constexpr int ROW_DELTA_WARPS = 8;

template <class E>
__global__ void __launch_bounds__(ROW_DELTA_WARPS * 32) dma_row_delta(const Params p) {
    typedef typename E::T T;
    const long long row = (long long)blockIdx.x * ROW_DELTA_WARPS + threadIdx.x / 32;
    const long long b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    if (row >= p.seqlen_q) return;
    const T* o = static_cast<const T*>(p.out) + b * p.so_b + h * p.so_h + row * p.so_s;
    const T* d_o = static_cast<const T*>(p.dout) + b * p.sq_b + h * p.sq_h + row * p.sq_s;
    float sum = 0.f;
    for (long long d = threadIdx.x % 32; d < p.head_dim; d += 32)
        sum += E::to_f32(o[d]) * E::to_f32(d_o[d]);
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
    if (threadIdx.x % 32 == 0) p.delta[b * p.slse_b + h * p.slse_h + row] = sum;
}

// lse (in base 2, as the scores) and delta of one row for the backward: empty rows
// (lse = -inf) and rows past the end read lse = +inf, so their p = exp2(s - lse) is 0.
DMA_DEVICE void row_stats(const Params& p, long long b, long long h, long long row,
                          float& lse, float& delta) {
    lse = __int_as_float(0x7f800000);
    delta = 0.f;
    if (row < p.seqlen_q) {
        const long long at = b * p.slse_b + h * p.slse_h + row;
        const float stored = p.lse[at];
        if (stored != neg_inf()) lse = stored * LOG2E;
        delta = p.delta[at];
    }
}

// Where a dq program's d attn_bias goes: its (batch, head)'s row 0 and key 0 in p.dab, or
// nullptr when no d attn_bias is asked for. Worked out once per program, not per pair.
DMA_DEVICE float* bias_grad_rows(const Params& p, long long b, long long h) {
    return p.need_dab ? p.dab + b * p.sdab_b + h / p.dab_hdiv * p.sdab_h : nullptr;
}

// d scores of one warp's 16 x BLOCK_N tile in place of the scores s, from dp = dO V^T
// (and d attn_bias added at dab, bias_grad_rows', when asked for: atomically, since the
// heads and rows or keys that the bias broadcasts add into one element; in deterministic
// mode dab is a (B, H, Sq, Sk) buffer of zeros with one writer per element, so the add is
// exact there). Only KEEP_MASKS tiles can have one: a d attn_bias needs an attn_bias, which
// makes every tile test its pairs with the masks (full_tile_slots is 0 with an attn_bias,
// and the interval plan never has one), so the other tiles carry no per-pair branch on it.
template <class E, int NT, class Test>
DMA_DEVICE void dq_scores(float (&s)[NT][4], const float (&dp)[NT][4], const ScoreInputs<E>& in,
                          const Params& p, float* dab, int row_w, const KeyFacts* facts,
                          const float (&lse)[2], const float (&delta)[2]) {
    for_each_pair<NT>([&](int nt, int e) {
        const int row = row_w + frag_row(e);
        const KeyFacts& key = facts[frag_col(nt, e)];
        float th;
        const float score = masked_score<E, Test>(in, row, key, s[nt][e], th);
        const float pe = fast_exp2(score - lse[e >> 1]);
        const float ds = pe * (dp[nt][e] - delta[e >> 1]);
        if (Test::value == KEEP_MASKS && dab && row < p.seqlen_q && key.id >= 0)
            atomicAdd(dab + row * p.sdab_r + key.id * p.sdab_c, ds);
        s[nt][e] = Test::softcap ? ds * (1.f - th * th) : ds;  // d score
    });
}

// dq_scores in two passes, so that dP's product runs during the first (the warpgroup dq
// without a softcap, whose d score needs no tanh kept per pair): the probabilities into s,
// then the d scores (and d attn_bias) from them and dp.
template <class E, int NT, class Test>
DMA_DEVICE void dq_probabilities(float (&s)[NT][4], const ScoreInputs<E>& in, int row_w,
                                 const KeyFacts* facts, const float (&lse)[2]) {
    for_each_pair<NT>([&](int nt, int e) {
        float th;
        s[nt][e] = fast_exp2(masked_score<E, Test>(in, row_w + frag_row(e),
                                                   facts[frag_col(nt, e)], s[nt][e], th)
                             - lse[e >> 1]);
    });
}

template <class E, int NT, class Test>
DMA_DEVICE void dq_dscores(float (&s)[NT][4], const float (&dp)[NT][4], const Params& p,
                           float* dab, int row_w, const KeyFacts* facts,
                           const float (&delta)[2]) {
    for_each_pair<NT>([&](int nt, int e) {
        const float ds = s[nt][e] * (dp[nt][e] - delta[e >> 1]);
        const int row = row_w + frag_row(e), key = facts[frag_col(nt, e)].id;
        if (Test::value == KEEP_MASKS && dab && row < p.seqlen_q && key >= 0)
            atomicAdd(dab + row * p.sdab_r + key * p.sdab_c, ds);
        s[nt][e] = ds;
    });
}

// dq of a warp's 16 rows (from row_w), times the softmax scale (the scores' product was
// unscaled).
template <class E, int DT>
DMA_DEVICE void store_dq_rows(const Params& p, long long q_off, int row_w,
                              const float (&dq)[DT][4]) {
    typename E::T* dq_out = static_cast<typename E::T*>(p.dq) + q_off;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const long long row = row_w + frag_row(e);
            const int d = frag_col(dt, e);
            if (row < p.seqlen_q && d < p.head_dim)
                dq_out[row * p.sq_s + d] = E::from_f32(dq[dt][e] * (float)p.scale);
        }
}

// The forward's pipeline with V used first: K(i) is copied while dp = dO V(i)^T runs, V(i + 1)
// while the scores, d scores and dq of tile i are computed.
template <class E, int D_PAD, int BLOCK_M, int BLOCK_N, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK_M * 2, DMA_DQ_MIN_BLOCKS) dma_backward_dq(const Params p) {
    typedef typename E::T T;
    constexpr int THREADS = BLOCK_M * 2;
    constexpr int LD = D_PAD + SMEM_PAD, LDP = BLOCK_N + SMEM_PAD;
    constexpr int DT = D_PAD / 8, NT = BLOCK_N / 8;
    static_assert(THREADS >= BLOCK_N, "one thread per key of a tile stages its ids");
    extern __shared__ __align__(16) unsigned char smem[];
    T* q_s = reinterpret_cast<T*>(smem);
    T* do_s = q_s + BLOCK_M * LD;
    T* k_s = do_s + BLOCK_M * LD;
    T* v_s = k_s + BLOCK_N * LD;
    T* p_s = v_s + BLOCK_N * LD;  // float32 only: ds on its way to the product
    __shared__ int key_ids[2][BLOCK_N];
    __shared__ KeyFacts facts[2][BLOCK_N];

    const int warp = threadIdx.x / 32;
    const QueryBlock<E, BLOCK_M, BLOCK_N> blk(p);
    const ScoreInputs<E>& in = blk.in;
    const T* q_w = q_s + warp * 16 * LD;
    const T* do_w = do_s + warp * 16 * LD;
    T* p_w = p_s + warp * 16 * LDP;
    const int row_w = (int)blk.row0 + warp * 16;
    float lse[2], delta[2];
    row_stats(p, blk.b, blk.h, row_w + frag_row(0), lse[0], delta[0]);
    row_stats(p, blk.b, blk.h, row_w + frag_row(2), lse[1], delta[1]);
    float* const dab = bias_grad_rows(p, blk.b, blk.h);

    float dq[DT][4];
    zero(dq);
    TileKeys<E, BLOCK_N> next;
    next.fetch(p, in, blk.list, 0, blk.n_slots);
    next.publish(key_ids[0], facts[0]);
    load_tile<E, BLOCK_M, D_PAD, THREADS, false>(q_s, static_cast<const T*>(p.q) + blk.q_off,
                                                 p.sq_s, nullptr, blk.row0, p.seqlen_q, p);
    load_tile<E, BLOCK_M, D_PAD, THREADS, false>(do_s, static_cast<const T*>(p.dout) + blk.q_off,
                                                 p.sq_s, nullptr, blk.row0, p.seqlen_q, p);
    __syncthreads();  // tile 0's ids
    if (blk.n_slots > 0)
        load_tile<E, BLOCK_N, D_PAD, THREADS, false>(v_s, blk.v, p.sv_s, key_ids[0], 0, 0, p);
    for (long long start = 0, tile = 0; start < blk.n_slots; start += BLOCK_N, ++tile) {
        const int cur = tile & 1;
        cp_async_wait<0>();
        __syncthreads();  // V(i), Q and dO landed; every warp is done with K(i - 1)
        load_tile<E, BLOCK_N, D_PAD, THREADS, false>(k_s, blk.k, p.sk_s, key_ids[cur], 0, 0, p);
        const bool more = start + BLOCK_N < blk.n_slots;
        if (more) next.fetch(p, in, blk.list, start + BLOCK_N, blk.n_slots);

        float s[NT][4], dp[NT][4];
        zero(dp);
        warp_mma<E, D_PAD, NT, true, true>(dp, do_w, LD, v_s, LD);
        if (more) next.publish(key_ids[cur ^ 1], facts[cur ^ 1]);
        cp_async_wait<0>();
        __syncthreads();  // K(i) landed; every warp is done with V(i); tile i + 1's ids
        if (more)
            load_tile<E, BLOCK_N, D_PAD, THREADS, false>(v_s, blk.v, p.sv_s, key_ids[cur ^ 1], 0,
                                                         0, p);
        zero(s);
        warp_mma<E, D_PAD, NT, true, true>(s, q_w, LD, k_s, LD);
        with_keep_test<SOFTCAP, false>(in, start + BLOCK_N <= blk.n_full, [&](auto test) {
            dq_scores<E, NT, decltype(test)>(s, dp, in, p, dab, row_w, facts[cur], lse, delta);
        });
        warp_mma_scores<E, NT, DT, false>(dq, s, p_w, LDP, k_s, LD);
    }
    cp_async_wait<0>();
    store_dq_rows<E>(p, blk.q_off, row_w, dq);
}

// dq on Hopper's warpgroup products (sm_90a; the shapes of dma_forward_wgmma): the walk,
// tests and d scores of dma_backward_dq on 128-row blocks and 64-key tiles, with the
// forward's three warpgroups. The producer copies Q and dO once, then each tile's K (warps
// 0 and 1, which also stage the keys' facts) and V (warps 2 and 3) into a ring of
// DQ_KV_BUFFERS buffers. Per tile, a consumer computes S = Q K^T and dP = dO V^T from shared
// memory, then dq += dS K with dS from registers: iteration i issues S(i), dP(i) and
// dq += dS K(i - 1) back to back and waits for each in turn, so P is computed while dP runs
// and dS while the dq product runs. Tile i - 1's buffers go back to the producer once that
// product is done.
constexpr int DQ_KV_BUFFERS = 3;

template <class E, int D_PAD, int BLOCK_N, bool SOFTCAP>
__global__ void __launch_bounds__(WGMMA_PRODUCER_THREADS, 1) dma_backward_dq_wgmma(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef typename E::T T;
    constexpr int BLOCK_M = WGMMA_BLOCK_M, S = DQ_KV_BUFFERS;
    constexpr int DT = D_PAD / 8, NT = BLOCK_N / 8;
    constexpr unsigned ROWS_BYTES = BLOCK_M * D_PAD * 2, KV_BYTES = BLOCK_N * D_PAD * 2;
    static_assert(BLOCK_N == 64, "two producer warps per tensor of a tile");
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned q_s = swizzled_tiles(smem);
    const unsigned do_s = q_s + ROWS_BYTES, k_s = do_s + ROWS_BYTES;
    const unsigned v_s = k_s + S * KV_BYTES;  // S buffers of K and of V
    __shared__ KeyFacts facts[S][BLOCK_N];  // staged with K
    __shared__ __align__(8) BufferBarriers rows_bar, tile_bars[S];

    const int group = warpgroup_index();
    const QueryBlock<E, BLOCK_M, BLOCK_N> blk(p);
    const ScoreInputs<E>& in = blk.in;
    const int head_dim = (int)p.head_dim;
    const long long n_tiles = (blk.n_slots + BLOCK_N - 1) / BLOCK_N;
    auto parity = [](long long t) { return use_parity(t, S); };

    if (threadIdx.x == 0) {
        init_buffer(rows_bar, PRODUCER_THREADS, CONSUMER_WARPS);
        for (int i = 0; i < S; ++i)
            init_buffer(tile_bars[i], PRODUCER_THREADS + PRODUCER_WARPS, CONSUMER_WARPS);
    }
    __syncthreads();  // the barriers exist before anyone arrives or waits

    if (group == 0) {
        // Producer: thread i copies row i of Q and dO, then key i % BLOCK_N of every tile:
        // its K row (and facts) for i < BLOCK_N, its V row otherwise.
        warpgroup_registers_down<PRODUCER_REGISTERS>();
        const int row = (int)threadIdx.x, key = row % BLOCK_N;
        const bool copies_k = row < BLOCK_N;
        const long long q_row = blk.row0 + row;
        const int q_id = q_row < p.seqlen_q ? (int)q_row : -1;
        copy_rows_of_lanes<E, BLOCK_M, D_PAD>(q_s, static_cast<const T*>(p.q) + blk.q_off,
                                              p.sq_s, q_id, head_dim);
        copy_rows_of_lanes<E, BLOCK_M, D_PAD>(do_s, static_cast<const T*>(p.dout) + blk.q_off,
                                              p.sq_s, q_id, head_dim);
        mbarrier_arrive_on_copies(shared_address(&rows_bar.full));
        const T* const base = copies_k ? blk.k : blk.v;
        const long long stride = copies_k ? p.sk_s : p.sv_s;
        const unsigned tiles_s = copies_k ? k_s : v_s;
        auto key_id = [&](long long t) {
            return key_tile_id<BLOCK_N>(p, blk.list, t * BLOCK_N, key, blk.n_slots);
        };
        int id = n_tiles > 0 ? key_id(0) : -1;
        for (long long t = 0; t < n_tiles; ++t) {
            const int next_id = t + 1 < n_tiles ? key_id(t + 1) : -1;  // loads early
            const BufferBarriers& bar = tile_bars[t % S];
            wait_until_free(bar, parity(t));
            copy_rows_of_lanes<E, BLOCK_N, D_PAD>(tiles_s + (t % S) * KV_BYTES, base, stride, id,
                                                  head_dim);
            mbarrier_arrive_on_copies(shared_address(&bar.full));
            if (copies_k) facts[t % S][key] = key_facts(in, id);
            warp_arrive(bar);
            id = next_id;
        }
        cp_async_wait<0>();  // nothing in flight when the block ends
        return;
    }

    // Consumers: warpgroup `group` (1 or 2) owns rows 64 (group - 1) on.
    warpgroup_registers_up<CONSUMER_REGISTERS>();
    const int consumer = group - 1, warp = (int)threadIdx.x / 32 - 4;
    const int row_w = (int)blk.row0 + warp * 16;
    float lse[2], delta[2];
    row_stats(p, blk.b, blk.h, row_w + frag_row(0), lse[0], delta[0]);
    row_stats(p, blk.b, blk.h, row_w + frag_row(2), lse[1], delta[1]);
    float* const dab = bias_grad_rows(p, blk.b, blk.h);

    float dq[DT][4], s[NT][4], dp[NT][4];
    unsigned ds[BLOCK_N / 16][4] = {};  // dS(i - 1) packed, for dq += dS K(i - 1)
    zero(dq);
    zero(s);  // defined inputs for the first products, which overwrite them
    zero(dp);
    if (n_tiles > 0) wait_for_copies(rows_bar, 0);
    for (long long t = 0; t < n_tiles; ++t) {
        const int buffer = (int)(t % S);
        // Before tile 0 the dq product reads tile 0's own K (its dS is 0).
        const int last_buffer = t > 0 ? (int)((t - 1) % S) : 0;
        wait_for_copies(tile_bars[buffer], parity(t));
        // S and dP are committed apart, so that P is computed while dP runs, and dS while
        // dq += dS K(i - 1) runs (the first tile's adds dS = 0 times K(0): products issued
        // under a condition are serialised).
        wgmma_fence();
        wgmma_rows_by_rows<E, D_PAD, BLOCK_M, BLOCK_N>(s, q_s, consumer * 64,
                                                       k_s + buffer * KV_BYTES);
        wgmma_commit();
        wgmma_rows_by_rows<E, D_PAD, BLOCK_M, BLOCK_N>(dp, do_s, consumer * 64,
                                                       v_s + buffer * KV_BYTES);
        wgmma_commit();
        wgmma_registers_by_rows<E, D_PAD, BLOCK_N>(dq, ds, k_s + last_buffer * KV_BYTES);
        wgmma_commit();
        const bool all_kept = (t + 1) * BLOCK_N <= blk.n_full;
        const KeyFacts* const tile_facts = facts[buffer];
        if constexpr (SOFTCAP) {  // one pass: the d score needs each pair's tanh
            wgmma_wait<1>();
            hold_accumulator(s);
            hold_accumulator(dp);
            with_keep_test<SOFTCAP, false>(in, all_kept, [&](auto test) {
                dq_scores<E, NT, decltype(test)>(s, dp, in, p, dab, row_w, tile_facts, lse,
                                                 delta);
            });
        } else {
            wgmma_wait<2>();
            hold_accumulator(s);
            with_keep_test<SOFTCAP, false>(in, all_kept, [&](auto test) {
                dq_probabilities<E, NT, decltype(test)>(s, in, row_w, tile_facts, lse);
            });
            wgmma_wait<1>();
            hold_accumulator(dp);
            with_keep_test<SOFTCAP, false>(in, all_kept, [&](auto test) {
                dq_dscores<E, NT, decltype(test)>(s, dp, p, dab, row_w, tile_facts, delta);
            });
        }
        wgmma_wait<0>();
        hold_accumulator(dq);
        if (t > 0) hand_back(tile_bars[last_buffer]);  // dq += dS K(i - 1) is done
        pack_operand<E>(ds, s);
    }
    if (n_tiles > 0) {  // the last tile's dq += dS K
        wgmma_fence();
        wgmma_registers_by_rows<E, D_PAD, BLOCK_N>(dq, ds, k_s + ((n_tiles - 1) % S) * KV_BYTES);
        wgmma_commit();
        wgmma_wait<0>();
        hold_accumulator(dq);
    }
    store_dq_rows<E>(p, blk.q_off, row_w, dq);
#else
    __trap();  // compiled for another target: the launcher never runs it there
#endif
}

// Probabilities (in st) and d scores (in dpt) of one warp's transposed 16-key x BLOCK_M-row
// tile, from the scores st and dpt = V dO^T; d key_bias summed per key into dkb.
template <class E, int MT, class Test>
DMA_DEVICE void dkdv_scores(float (&st)[MT][4], float (&dpt)[MT][4], float (&dkb)[2],
                            const ScoreInputs<E>& in, int row0, const KeyFacts (&mine)[2],
                            const float* lse, const float* delta) {
    for_each_pair<MT>([&](int mt, int e) {
        const int r = frag_col(mt, e);
        float th;
        const float score = masked_score<E, Test>(in, row0 + r, mine[e >> 1], st[mt][e], th);
        const float pe = fast_exp2(score - lse[r]);
        const float ds = pe * (dpt[mt][e] - delta[r]);
        dkb[e >> 1] += ds;
        st[mt][e] = pe;
        dpt[mt][e] = Test::softcap ? ds * (1.f - th * th) : ds;  // d score
    });
}

// Whether every row of the tile of BLOCK_M rows from row0 keeps both keys of every lane of
// the warp (`mine`), with no mask or bias to test: the per-pair test can then drop no pair.
template <int BLOCK_M, class E>
DMA_DEVICE bool dkdv_all_kept(const ScoreInputs<E>& in, long long row0,
                              const KeyFacts (&mine)[2]) {
    return __all_sync(0xffffffffu, mine[0].first <= row0 && row0 + BLOCK_M <= mine[0].end
                                       && mine[1].first <= row0 && row0 + BLOCK_M <= mine[1].end
                                       && !in.attn_bias && !in.attn_mask);
}

// dkdv_scores of a warp's tile of BLOCK_M rows from row0, with the per-pair test skipped
// where it can drop no pair: a listed tile the mask keeps whole (`whole`), or every row of
// the tile keeping both keys of every lane of the warp (`mine`) with no mask or bias.
template <class E, int MT, int BLOCK_M, bool SOFTCAP>
DMA_DEVICE void dkdv_tile_scores(float (&st)[MT][4], float (&dpt)[MT][4], float (&dkb)[2],
                                 const ScoreInputs<E>& in, long long row0,
                                 const KeyFacts (&mine)[2], bool whole, const float* lse,
                                 const float* delta) {
    const bool all_kept = dkdv_all_kept<BLOCK_M>(in, row0, mine);
    with_keep_test<SOFTCAP, false>(in, all_kept || whole, [&](auto test) {
        dkdv_scores<E, MT, decltype(test)>(st, dpt, dkb, in, (int)row0, mine, lse, delta);
    });
}

// dkdv_scores in two passes, so that a product can run between them (the warpgroup dk/dv
// without a softcap, whose d score needs no tanh kept per pair): first the probabilities
// into st, before dP^T has landed; then the d scores into dpt and d key_bias into dkb,
// while dv += P^T dO runs.
template <class E, int MT, class Test>
DMA_DEVICE void dkdv_probabilities(float (&st)[MT][4], const ScoreInputs<E>& in, int row0,
                                   const KeyFacts (&mine)[2], const float* lse) {
    for_each_pair<MT>([&](int mt, int e) {
        const int r = frag_col(mt, e);
        float th;
        st[mt][e] = fast_exp2(masked_score<E, Test>(in, row0 + r, mine[e >> 1], st[mt][e], th)
                              - lse[r]);
    });
}

template <int MT>
DMA_DEVICE void dkdv_dscores(const float (&st)[MT][4], float (&dpt)[MT][4], float (&dkb)[2],
                             const float* delta) {
    for_each_pair<MT>([&](int mt, int e) {
        const float ds = st[mt][e] * (dpt[mt][e] - delta[frag_col(mt, e)]);
        dkb[e >> 1] += ds;
        dpt[mt][e] = ds;
    });
}

// The first pass of the two, with dkdv_tile_scores' choice of test (no softcap: the two
// passes serve only the kernels without one).
template <class E, int MT, int BLOCK_M>
DMA_DEVICE void dkdv_tile_probabilities(float (&st)[MT][4], const ScoreInputs<E>& in,
                                        long long row0, const KeyFacts (&mine)[2], bool whole,
                                        const float* lse) {
    const bool all_kept = dkdv_all_kept<BLOCK_M>(in, row0, mine);
    constexpr bool SOFTCAP = false;
    with_keep_test<SOFTCAP, false>(in, all_kept || whole, [&](auto test) {
        dkdv_probabilities<E, MT, decltype(test)>(st, in, (int)row0, mine, lse);
    });
}

// The row tiles a dk/dv key tile walks: `count` tiles of BLOCK_M rows, consecutive from row
// `lo`, or listed (an explicit mask's live row tiles, the first `whole` of them kept whole:
// listed_whole_tiles).
template <int BLOCK_M>
struct RowTiles {
    const int* list = nullptr;
    long long lo = 0, count = 0, whole = 0;

    DMA_DEVICE long long start(long long j) const {
        return list ? (long long)list[j] * BLOCK_M : lo + j * BLOCK_M;
    }
};

// What a dk/dv program walks, in its two modes: the candidate keys of a coarse block of rows
// (blockIdx.x), in tiles split over blockIdx.z, for heads_per_program query heads; or one tile
// of BLOCK_N consecutive keys for every query head of its kv head.
template <int BLOCK_N>
struct DkdvProgram {
    long long b, h0, n_heads, n_slots, first_tile, tile_step, row_base, row_end;
    const int* cand = nullptr;  // the block's candidate keys (candidate mode)

    DMA_DEVICE explicit DkdvProgram(const Params& p) {
        if (p.candidate_tiles) {
            const long long block = blockIdx.x;
            b = blockIdx.y / p.programs_per_batch;
            h0 = (blockIdx.y % p.programs_per_batch) * p.heads_per_program;
            n_heads = p.heads_per_program;
            row_base = block * p.coarse_rows;
            row_end = lmin(row_base + p.coarse_rows, p.seqlen_q);
            cand = candidate_list(p, b, h0, block);
            n_slots = block_count(p, p.candidate_count, b, h0, block);
            first_tile = (long long)blockIdx.z * BLOCK_N;
            tile_step = p.key_split * BLOCK_N;
        } else {
            b = blockIdx.y / p.kv_heads;
            h0 = (blockIdx.y % p.kv_heads) * p.group;
            n_heads = p.group;
            row_base = 0;
            row_end = p.seqlen_q;
            n_slots = p.seqlen_k;
            first_tile = (long long)blockIdx.x * BLOCK_N;
            tile_step = p.seqlen_k;
        }
    }
};

// The row tiles that may keep a key of a dk/dv key tile (its ids in key_ids) for head h:
// listed per key tile under an explicit mask (those kept whole first); else consecutive
// tiles of BLOCK_M rows (aligned to row_base) over the rows that keep some key of the tile:
// the union of the keys' plan intervals (DMA case; reduced in `row_range`, shared), or the
// rows from the tile's first causal row, within [row_base, row_end). Every thread of the
// THREADS that share row_range calls it (thread `tid` of them); `sync` is their barrier.
template <int BLOCK_M, int BLOCK_N, int THREADS, class E, class Sync>
DMA_DEVICE RowTiles<BLOCK_M> key_tile_rows(const Params& p, const ScoreInputs<E>& in,
                                           long long b, long long h, long long start,
                                           const int* key_ids, long long row_base,
                                           long long row_end, int* row_range, int tid,
                                           Sync&& sync) {
    RowTiles<BLOCK_M> rows;
    if (p.tile_list) {
        rows.list = candidate_list(p, b, h, blockIdx.x);
        rows.count = block_count(p, p.candidate_count, b, h, blockIdx.x);
        rows.whole = listed_whole_tiles(p, b, h, blockIdx.x);
        return rows;
    }
    long long row_lo = 0, row_hi = p.seqlen_q;
    if (p.interval) {
        sync();
        if (tid == 0) {
            row_range[0] = (int)p.seqlen_q;
            row_range[1] = 0;
        }
        sync();
        for (int i = tid; i < BLOCK_N; i += THREADS) {
            const int key = key_ids[i];
            if (key < 0) continue;
            const int first = p.causal ? key - (int)p.causal_offset : 0;
            const int end = in.end_row[key];
            if (end > first) {
                atomicMin(&row_range[0], first);
                atomicMax(&row_range[1], end);
            }
        }
        sync();
        row_lo = row_range[0];
        row_hi = row_range[1];
    } else if (p.causal) {
        row_lo = lmax(start - p.causal_offset, 0);
    }
    row_lo = lmax(row_lo, row_base);
    row_hi = lmin(row_hi, row_end);
    rows.lo = row_base + ((row_lo - row_base) / BLOCK_M) * BLOCK_M;
    rows.count = row_hi > rows.lo ? (row_hi - rows.lo + BLOCK_M - 1) / BLOCK_M : 0;
    return rows;
}

// d key_bias of head h for a warp's 16 keys (ids from `keys`): dkb[r] holds the lane's share
// for key frag_row(2 r), summed over the quad here; added with atomics in the candidate
// mode (several programs share a key), else written.
DMA_DEVICE void store_dkb(const Params& p, long long b, long long h, const int* keys,
                          float (&dkb)[2]) {
    dkb[0] = quad_sum(dkb[0]);
    dkb[1] = quad_sum(dkb[1]);
    if (p.need_dkb && (threadIdx.x & 3) == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = keys[frag_row(2 * r)];
            if (key < 0) continue;
            float* at = p.dkb + b * p.sdkb_b + h * p.sdkb_h + key;
            if (p.candidate_tiles) atomicAdd(at, dkb[r]);
            else *at = dkb[r];
        }
    }
}

// dk (times the softmax scale) and dv of a warp's 16 keys: float32 atomics into the float32
// buffers in the candidate mode, else written in the input type (one writer per element).
template <class E, int DT>
DMA_DEVICE void store_dkdv(const Params& p, long long b, long long hk, const int* keys,
                           const float (&dk)[DT][4], const float (&dv)[DT][4]) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = keys[frag_row(e)];
            const int d = frag_col(dt, e);
            if (key < 0 || d >= p.head_dim) continue;
            const long long at = b * p.sdk_b + hk * p.sdk_h + key * p.sdk_s + d;
            const float dk_val = dk[dt][e] * (float)p.scale;
            if (p.candidate_tiles) {
                atomicAdd(static_cast<float*>(p.dk) + at, dk_val);
                atomicAdd(static_cast<float*>(p.dv) + at, dv[dt][e]);
            } else {
                static_cast<typename E::T*>(p.dk)[at] = E::from_f32(dk_val);
                static_cast<typename E::T*>(p.dv)[at] = E::from_f32(dv[dt][e]);
            }
        }
}

// Q and dO rows row0.. of one head into a dk/dv row buffer (dO right after Q), left in flight.
template <class E, int BLOCK_M, int D_PAD, int THREADS>
DMA_DEVICE void load_rows(typename E::T* dst, const typename E::T* q, const typename E::T* dout,
                          long long row0, const Params& p) {
    constexpr int LD = D_PAD + SMEM_PAD;
    load_tile<E, BLOCK_M, D_PAD, THREADS, false>(dst, q, p.sq_s, nullptr, row0, p.seqlen_q, p);
    load_tile<E, BLOCK_M, D_PAD, THREADS, false>(dst + BLOCK_M * LD, dout, p.sq_s, nullptr, row0,
                                                 p.seqlen_q, p);
}

template <class E, int D_PAD, int BLOCK_M, int BLOCK_N, bool SOFTCAP>
__global__ void __launch_bounds__(BLOCK_N * 2) dma_backward_dkdv(const Params p) {
    typedef typename E::T T;
    constexpr int THREADS = BLOCK_N * 2;  // one warp per 16 keys
    constexpr int LD = D_PAD + SMEM_PAD, LDT = BLOCK_M + SMEM_PAD;
    constexpr int DT = D_PAD / 8, MT = BLOCK_M / 8;
    static_assert(THREADS >= BLOCK_M, "one thread per row of a tile stages its lse and delta");
    extern __shared__ __align__(16) unsigned char smem[];
    T* k_s = reinterpret_cast<T*>(smem);
    T* v_s = k_s + BLOCK_N * LD;
    // Row tiles (Q, dO) are double-buffered unless a row is 1 KiB or more (float32 at head
    // dim 256), where two buffers would not fit in shared memory (dkdv_row_buffers in the
    // launcher); lse and delta always are.
    constexpr int ROW_BUFFERS = sizeof(T) * D_PAD >= 1024 ? 1 : 2;
    T* q_buf = v_s + BLOCK_N * LD;  // Q, dO of buffer 0, then of buffer 1
    T* pt_s = q_buf + 2 * ROW_BUFFERS * BLOCK_M * LD;  // float32 only: p, ds transposed
    __shared__ int key_ids[BLOCK_N];
    __shared__ float lse_s[2][BLOCK_M], delta_s[2][BLOCK_M];
    __shared__ int row_range[2];

    const int warp = threadIdx.x / 32;
    const DkdvProgram<BLOCK_N> prog(p);
    const long long b = prog.b, h0 = prog.h0, n_heads = prog.n_heads, n_slots = prog.n_slots;
    const long long first_tile = prog.first_tile, tile_step = prog.tile_step;
    const long long row_base = prog.row_base, row_end = prog.row_end;
    const int* cand = prog.cand;
    const long long hk = h0 / p.group;
    const T* k = static_cast<const T*>(p.k) + b * p.sk_b + hk * p.sk_h;
    const T* v = static_cast<const T*>(p.v) + b * p.sv_b + hk * p.sv_h;
    const T* k_w = k_s + warp * 16 * LD;
    const T* v_w = v_s + warp * 16 * LD;
    T* pt_w = pt_s + warp * 16 * LDT;

    for (long long start = first_tile; start < n_slots; start += tile_step) {
        __syncthreads();
        for (int i = threadIdx.x; i < BLOCK_N; i += THREADS)
            key_ids[i] = key_tile_id<BLOCK_N>(p, cand, start, i, n_slots);
        __syncthreads();
        load_tile<E, BLOCK_N, D_PAD, THREADS>(k_s, k, p.sk_s, key_ids, 0, 0, p);
        load_tile<E, BLOCK_N, D_PAD, THREADS>(v_s, v, p.sv_s, key_ids, 0, 0, p);
        float dk[DT][4], dv[DT][4];
        zero(dk);
        zero(dv);
        for (long long hh = 0; hh < n_heads; ++hh) {
            const long long h = h0 + hh;
            const ScoreInputs<E> in(p, b, h);
            __syncthreads();  // the tile's key ids (and K, V) are written
            const KeyFacts mine[2] = {key_facts(in, key_ids[warp * 16 + frag_row(0)]),
                                      key_facts(in, key_ids[warp * 16 + frag_row(2)])};
            const RowTiles<BLOCK_M> rows =
                key_tile_rows<BLOCK_M, BLOCK_N, THREADS>(p, in, b, h, start, key_ids, row_base,
                                                         row_end, row_range, threadIdx.x,
                                                         [] { __syncthreads(); });
            float dkb[2] = {0.f, 0.f};
            const long long q_off = b * p.sq_b + h * p.sq_h;
            const T* q = static_cast<const T*>(p.q) + q_off;
            const T* dout = static_cast<const T*>(p.dout) + q_off;
            // Tile j + 1's Q, dO, lse and delta are copied while tile j is computed (with
            // one row buffer: after it, behind a second barrier).
            float next_lse, next_delta;
            __syncthreads();  // every warp is done with the previous head's buffers
            if (rows.count > 0) {
                load_rows<E, BLOCK_M, D_PAD, THREADS>(q_buf, q, dout, rows.start(0), p);
                if (threadIdx.x < BLOCK_M) {
                    row_stats(p, b, h, rows.start(0) + threadIdx.x, next_lse, next_delta);
                    lse_s[0][threadIdx.x] = next_lse;
                    delta_s[0][threadIdx.x] = next_delta;
                }
            }
            for (long long j = 0; j < rows.count; ++j) {
                const long long row0 = rows.start(j);
                const int cur = j & 1, buf = ROW_BUFFERS == 2 ? cur : 0;
                const T* q_s = q_buf + 2 * buf * BLOCK_M * LD;
                const T* do_s = q_s + BLOCK_M * LD;
                T* q_next = q_buf + 2 * (ROW_BUFFERS == 2 ? cur ^ 1 : 0) * BLOCK_M * LD;
                cp_async_wait<0>();
                __syncthreads();  // tile j landed; every warp is done with tile j - 1's buffer
                const bool more = j + 1 < rows.count;
                const long long next_row0 = more ? rows.start(j + 1) : 0;
                if (more && threadIdx.x < BLOCK_M)
                    row_stats(p, b, h, next_row0 + threadIdx.x, next_lse, next_delta);
                if (more && ROW_BUFFERS == 2)
                    load_rows<E, BLOCK_M, D_PAD, THREADS>(q_next, q, dout, next_row0, p);

                float st[MT][4], dpt[MT][4];  // transposed: rows are keys, columns query rows
                zero(st);
                zero(dpt);
                warp_mma<E, D_PAD, MT, true, true>(st, k_w, LD, q_s, LD);
                warp_mma<E, D_PAD, MT, true, true>(dpt, v_w, LD, do_s, LD);
                dkdv_tile_scores<E, MT, BLOCK_M, SOFTCAP>(st, dpt, dkb, in, row0, mine,
                                                          j < rows.whole, lse_s[cur],
                                                          delta_s[cur]);
                warp_mma_scores<E, MT, DT, false>(dv, st, pt_w, LDT, do_s, LD);
                warp_mma_scores<E, MT, DT, false>(dk, dpt, pt_w, LDT, q_s, LD);
                if (more && ROW_BUFFERS == 1) {
                    __syncthreads();  // every warp is done with the one buffer
                    load_rows<E, BLOCK_M, D_PAD, THREADS>(q_next, q, dout, next_row0, p);
                }
                if (more && threadIdx.x < BLOCK_M) {  // published by the next barrier
                    lse_s[cur ^ 1][threadIdx.x] = next_lse;
                    delta_s[cur ^ 1][threadIdx.x] = next_delta;
                }
            }
            cp_async_wait<0>();
            store_dkb(p, b, h, key_ids + warp * 16, dkb);
        }
        store_dkdv<E>(p, b, hk, key_ids + warp * 16, dk, dv);
    }
}

// dk/dv on Hopper's warpgroup products (sm_90a; the shapes of dma_forward_wgmma): the walk,
// modes and tests of dma_backward_dkdv on key tiles of BLOCK_N = 128 keys and row tiles of
// BLOCK_M = 64, with the forward's three warpgroups. The producer copies each key tile's K
// and V (and publishes its key ids), then, for every head and row tile, that tile's Q and dO
// rows (warps 0-1 and 2-3) with their lse and delta into a ring of DKDV_ROW_BUFFERS buffers.
// Each consumer owns 64 keys (warp w: keys 16 (w - 4) on): per row tile, S^T = K Q^T and
// dP^T = V dO^T from shared memory, then dv += P^T dO and dk += dS^T Q with P^T and dS^T
// from registers; it hands the row buffer back once those products are done, and the key
// tile's once dk and dv are stored. Producer and consumers both work out each head's row
// tiles (key_tile_rows, each side with its own barrier), so they walk the same sequence.
constexpr int DKDV_ROW_BUFFERS = 3;
// dk and dv beside two score tiles take 240 registers a consumer thread; the producer makes
// do with the 24 left (it spills, off the consumers' path).
constexpr int DKDV_PRODUCER_REGISTERS = 24, DKDV_CONSUMER_REGISTERS = 240;
enum NamedBarrier { PRODUCER_BARRIER = 1, CONSUMER_BARRIER = 2 };

template <class E, int D_PAD, int BLOCK_M, int BLOCK_N, bool SOFTCAP>
__global__ void __launch_bounds__(WGMMA_PRODUCER_THREADS, 1)
    dma_backward_dkdv_wgmma(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef typename E::T T;
    constexpr int S = DKDV_ROW_BUFFERS, CONSUMER_THREADS = 256;
    constexpr int DT = D_PAD / 8, MT = BLOCK_M / 8;
    constexpr unsigned KV_BYTES = BLOCK_N * D_PAD * 2, ROWS_BYTES = BLOCK_M * D_PAD * 2;
    static_assert(BLOCK_N == 128 && BLOCK_M == 64, "a producer thread per key, two warps a row");
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned k_s = swizzled_tiles(smem);
    const unsigned v_s = k_s + KV_BYTES;
    const unsigned rows_s = v_s + KV_BYTES;  // buffer i: Q at rows_s + 2 i ROWS_BYTES, then dO
    __shared__ int key_ids[BLOCK_N];  // staged with K and V
    __shared__ float lse_s[S][BLOCK_M], delta_s[S][BLOCK_M];  // staged with Q and dO
    __shared__ int producer_range[2], consumer_range[2];
    __shared__ __align__(8) BufferBarriers key_bar, row_bars[S];

    const int group = warpgroup_index();
    const DkdvProgram<BLOCK_N> prog(p);
    const long long b = prog.b, h0 = prog.h0, n_heads = prog.n_heads, n_slots = prog.n_slots;
    const long long row_base = prog.row_base, row_end = prog.row_end;
    const long long hk = h0 / p.group;
    const T* k = static_cast<const T*>(p.k) + b * p.sk_b + hk * p.sk_h;
    const T* v = static_cast<const T*>(p.v) + b * p.sv_b + hk * p.sv_h;
    const int head_dim = (int)p.head_dim;

    if (threadIdx.x == 0) {
        init_buffer(key_bar, PRODUCER_THREADS + PRODUCER_WARPS, CONSUMER_WARPS);
        for (int i = 0; i < S; ++i)
            init_buffer(row_bars[i], PRODUCER_THREADS + PRODUCER_WARPS, CONSUMER_WARPS);
    }
    __syncthreads();  // the barriers exist before anyone arrives or waits

    // Key tiles (n of them so far) and row tiles (u so far, over every key tile and head)
    // count the uses of the key buffer and of the row ring, alike on both sides.
    long long n = 0, u = 0;
    if (group == 0) {
        // Producer: thread i copies key i of every key tile; thread i % BLOCK_M row i of the
        // row tiles: its Q row for i < BLOCK_M, its dO row otherwise.
        warpgroup_registers_down<DKDV_PRODUCER_REGISTERS>();
        const int tid = (int)threadIdx.x, row = tid % BLOCK_M;
        const bool copies_q = tid < BLOCK_M;
        for (long long start = prog.first_tile; start < n_slots; start += prog.tile_step, ++n) {
            const int id = key_tile_id<BLOCK_N>(p, prog.cand, start, tid, n_slots);
            wait_until_free(key_bar, use_parity(n, 1));
            copy_rows_of_lanes<E, BLOCK_N, D_PAD>(k_s, k, p.sk_s, id, head_dim);
            copy_rows_of_lanes<E, BLOCK_N, D_PAD>(v_s, v, p.sv_s, id, head_dim);
            mbarrier_arrive_on_copies(shared_address(&key_bar.full));
            key_ids[tid] = id;
            warp_arrive(key_bar);
            for (long long hh = 0; hh < n_heads; ++hh) {
                const long long h = h0 + hh;
                const ScoreInputs<E> in(p, b, h);
                const RowTiles<BLOCK_M> rows = key_tile_rows<BLOCK_M, BLOCK_N, PRODUCER_THREADS>(
                    p, in, b, h, start, key_ids, row_base, row_end, producer_range, tid,
                    [] { named_barrier<PRODUCER_BARRIER, PRODUCER_THREADS>(); });
                const long long q_off = b * p.sq_b + h * p.sq_h;
                const T* rows_base = static_cast<const T*>(copies_q ? p.q : p.dout) + q_off;
                for (long long j = 0; j < rows.count; ++j, ++u) {
                    const long long row0 = rows.start(j);
                    const BufferBarriers& bar = row_bars[u % S];
                    wait_until_free(bar, use_parity(u, S));
                    const unsigned q_buf = rows_s + 2 * (u % S) * ROWS_BYTES;
                    copy_rows_of_lanes<E, BLOCK_M, D_PAD>(
                        copies_q ? q_buf : q_buf + ROWS_BYTES, rows_base, p.sq_s,
                        row0 + row < p.seqlen_q ? (int)(row0 + row) : -1, head_dim);
                    mbarrier_arrive_on_copies(shared_address(&bar.full));
                    if (copies_q)
                        row_stats(p, b, h, row0 + row, lse_s[u % S][row], delta_s[u % S][row]);
                    warp_arrive(bar);
                }
            }
        }
        cp_async_wait<0>();  // nothing in flight when the block ends
        return;
    }

    // Consumers: warpgroup `group` (1 or 2) owns keys 64 (group - 1) on.
    warpgroup_registers_up<DKDV_CONSUMER_REGISTERS>();
    const int consumer = group - 1, warp = (int)threadIdx.x / 32 - 4;
    const int tid = (int)threadIdx.x - 128;
    for (long long start = prog.first_tile; start < n_slots; start += prog.tile_step, ++n) {
        wait_for_copies(key_bar, use_parity(n, 1));
        float dk[DT][4], dv[DT][4], st[MT][4], dpt[MT][4];
        zero(dk);
        zero(dv);
        zero(st);  // defined inputs for the first products, which overwrite them
        zero(dpt);
        for (long long hh = 0; hh < n_heads; ++hh) {
            const long long h = h0 + hh;
            const ScoreInputs<E> in(p, b, h);
            const KeyFacts mine[2] = {key_facts(in, key_ids[warp * 16 + frag_row(0)]),
                                      key_facts(in, key_ids[warp * 16 + frag_row(2)])};
            const RowTiles<BLOCK_M> rows = key_tile_rows<BLOCK_M, BLOCK_N, CONSUMER_THREADS>(
                p, in, b, h, start, key_ids, row_base, row_end, consumer_range, tid,
                [] { named_barrier<CONSUMER_BARRIER, CONSUMER_THREADS>(); });
            float dkb[2] = {0.f, 0.f};
            for (long long j = 0; j < rows.count; ++j, ++u) {
                const long long row0 = rows.start(j);
                const int buf = (int)(u % S);
                const unsigned q_cur = rows_s + 2 * buf * ROWS_BYTES, do_cur = q_cur + ROWS_BYTES;
                wait_for_copies(row_bars[buf], use_parity(u, S));
                // Transposed tiles: rows are the warpgroup's 64 keys, columns the query rows.
                // S^T and dP^T are committed apart, so that P is computed while dP^T runs.
                wgmma_fence();
                wgmma_rows_by_rows<E, D_PAD, BLOCK_N, BLOCK_M>(st, k_s, consumer * 64, q_cur);
                wgmma_commit();
                wgmma_rows_by_rows<E, D_PAD, BLOCK_N, BLOCK_M>(dpt, v_s, consumer * 64, do_cur);
                wgmma_commit();
                unsigned pt[BLOCK_M / 16][4], dst[BLOCK_M / 16][4];
                if constexpr (SOFTCAP) {  // one pass: the d score needs each pair's tanh
                    wgmma_wait<0>();
                    hold_accumulator(st);
                    hold_accumulator(dpt);
                    dkdv_tile_scores<E, MT, BLOCK_M, SOFTCAP>(st, dpt, dkb, in, row0, mine,
                                                              j < rows.whole, lse_s[buf],
                                                              delta_s[buf]);
                } else {  // P while dP^T runs
                    wgmma_wait<1>();
                    hold_accumulator(st);
                    dkdv_tile_probabilities<E, MT, BLOCK_M>(st, in, row0, mine, j < rows.whole,
                                                            lse_s[buf]);
                }
                pack_operand<E>(pt, st);
                wgmma_fence();
                wgmma_registers_by_rows<E, D_PAD, BLOCK_M>(dv, pt, do_cur);
                wgmma_commit();
                if constexpr (!SOFTCAP) {  // dS and d key_bias while dv += P^T dO runs
                    wgmma_wait<1>();
                    hold_accumulator(dpt);
                    dkdv_dscores<MT>(st, dpt, dkb, delta_s[buf]);
                }
                pack_operand<E>(dst, dpt);
                wgmma_fence();
                wgmma_registers_by_rows<E, D_PAD, BLOCK_M>(dk, dst, q_cur);
                wgmma_commit();
                wgmma_wait<0>();
                hold_accumulator(dv);
                hold_accumulator(dk);
                hand_back(row_bars[buf]);
            }
            store_dkb(p, b, h, key_ids + warp * 16, dkb);
        }
        store_dkdv<E>(p, b, hk, key_ids + warp * 16, dk, dv);
        hand_back(key_bar);
    }
#else
    __trap();  // compiled for another target: the launcher never runs it there
#endif
}
