// Building blocks shared by the kernels in dma_attention.cuh: element types, the warp-level
// matrix product, tile loads and the one place where a score and its kept test are computed
// (SPEC section 2; the twin of `_tile_scores` in triton_kernels.py).
//
// No CUDA headers are needed: half and bfloat16 travel as raw 16-bit words and convert
// through PTX, so the same source compiles under NVRTC (at run time) and nvcc (in CI).
#pragma once
#include "dma_params.cuh"

#define DMA_DEVICE __device__ __forceinline__

DMA_DEVICE float neg_inf() { return __int_as_float(0xff800000); }
// 2^x through the special-function unit (max relative error 2^-22; exp2(-inf) = 0).
DMA_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
DMA_DEVICE long long lmin(long long a, long long b) { return a < b ? a : b; }
DMA_DEVICE long long lmax(long long a, long long b) { return a > b ? a : b; }

// The query block of a forward or dq program: last to first, since under causal masking the
// later blocks hold the most keys, and starting the longest programs first leaves the short
// ones to fill the last wave.
DMA_DEVICE long long last_first_block() { return (long long)(gridDim.x - 1 - blockIdx.x); }

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
// tanh(x) = 1 - 2 / (e^2x + 1) through the special-function unit (absolute error about
// 1e-7; tanhf inlined at every score of an unrolled tile is long code), as triton's _tanh.
DMA_DEVICE float fast_tanh(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(fast_exp2(2.f * LOG2E * x) + 1.f));
    return 1.f - 2.f * r;
}
constexpr int SMEM_PAD = 8;  // elements added to each shared-memory row against bank conflicts

// ---------------------------------------------------------------------------------------
// Element types. Tensor-core types run mma.sync m16n8k16 (fp32 accumulation); float32 runs
// the same fragment layout with scalar FMAs, so it stays IEEE float32 end to end.
struct F16 {
    typedef unsigned short T;
    static constexpr bool TENSOR = true;
    static constexpr bool BF16_BITS = false;  // picks the type of warpgroup products
    static DMA_DEVICE float to_f32(T x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static DMA_DEVICE T from_f32(float f) {
        T x;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
        return x;
    }
    static DMA_DEVICE void mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

struct BF16 {
    typedef unsigned short T;
    static constexpr bool TENSOR = true;
    static constexpr bool BF16_BITS = true;
    static DMA_DEVICE float to_f32(T x) { return __uint_as_float(((unsigned)x) << 16); }
    static DMA_DEVICE T from_f32(float f) {
        T x;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));
        return x;
    }
    static DMA_DEVICE void mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// Two floats as one register of 16-bit elements, the first in the low half.
template <class E>
DMA_DEVICE unsigned pack2(float lo, float hi) {
    return (unsigned)E::from_f32(lo) | ((unsigned)E::from_f32(hi) << 16);
}

// One 16-wide k step of an A operand from two adjacent 8-column tiles of an accumulator
// (lo: columns 0-7, hi: 8-15), packed to 16 bits: mma.sync's A layout, which is also, per
// warp, the register A layout of a warpgroup product.
template <class E>
DMA_DEVICE void pack_k_step(unsigned (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack2<E>(lo[0], lo[1]);
    a[1] = pack2<E>(lo[2], lo[3]);
    a[2] = pack2<E>(hi[0], hi[1]);
    a[3] = pack2<E>(hi[2], hi[3]);
}

struct F32 {
    typedef float T;
    static constexpr bool TENSOR = false;
    static DMA_DEVICE float to_f32(T x) { return x; }
    static DMA_DEVICE T from_f32(float f) { return f; }
};

// ---------------------------------------------------------------------------------------
// Warp-level product on shared-memory tiles: c[16 MF x 8 NT] += A[16 MF x K] * B[K x 8 NT],
// as MF fragments of 16 rows (c[mf] holds rows 16 mf..16 mf + 15) that share each B fragment
// they read, so two fragments per warp halve B's shared-memory traffic per product.
// A(i, k) is a[i * lda + k] when A_KC (k contiguous) else a[k * lda + i]; B(k, j) is
// b[j * ldb + k] when B_KC else b[k * ldb + j]. Lane (g = lane / 4, t = lane % 4) owns the
// accumulator elements of mma.sync's C layout: c[mf][nt][e] is row 16 mf + g + 8 * (e / 2),
// column nt * 8 + 2 * t + e % 2. Every kernel reads its scores out of this layout. The
// overloads without the MF dimension are the one-fragment case.
template <bool KC, class T>
DMA_DEVICE T operand_at(const T* p, int ld, int outer, int k) {
    return KC ? p[outer * ld + k] : p[k * ld + outer];
}

// Row (within a fragment's 16) and column of accumulator element e of tile nt.
DMA_DEVICE int frag_row(int e) { return ((threadIdx.x & 31) >> 2) + 8 * (e >> 1); }
DMA_DEVICE int frag_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x & 3) + (e & 1); }

// Every element of a warp's accumulator tile of NT column tiles, unrolled: f(nt, e) for
// element [nt][e] (its row frag_row(e), column frag_col(nt, e)).
template <int NT, class F>
DMA_DEVICE void for_each_pair(F&& f) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(nt, e);
}

// ldmatrix: four 8x8 matrices of 16-bit elements from shared memory, one row address per
// lane (lanes 8i..8i+7 give the rows of matrix i, each 16-byte aligned); .trans transposes
// each matrix on the way. Register i of every lane holds its share of matrix i in the
// mma.sync fragment layout.
DMA_DEVICE unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 g; cvta.to.shared.u64 g, %1; cvt.u32.u64 %0, g; }" : "=r"(a) : "l"(p));
    return a;
}

template <bool TRANS>
DMA_DEVICE void ldmatrix_x4(unsigned (&r)[4], const unsigned short* p) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}

// One 16-wide k step on tensor cores: c[mf][nt] += A fragment af[mf] times B's column
// tiles, B's fragments loaded with ldmatrix (k 0-7 and 8-15 of column tiles nt and nt + 1 at
// once) and used by every fragment.
template <class E, int MF, int NT, bool B_KC>
DMA_DEVICE void mma_step(float (&c)[MF][NT][4], const unsigned (&af)[MF][4],
                         const typename E::T* b, int ldb, int k0) {
    const int lane = threadIdx.x & 31, quad = lane >> 3, in_quad = lane & 7;
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
        unsigned bf[4];
        if (B_KC)
            ldmatrix_x4<false>(bf, b + (nt * 8 + in_quad + (quad >> 1) * 8) * ldb + k0
                                       + (quad & 1) * 8);
        else
            ldmatrix_x4<true>(bf, b + (k0 + in_quad + (quad & 1) * 8) * ldb + nt * 8
                                      + (quad >> 1) * 8);
        const unsigned b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
            E::mma(c[mf][nt], af[mf], b0);
            E::mma(c[mf][nt + 1], af[mf], b1);
        }
    }
}

template <class E, int K, int NT, bool A_KC, bool B_KC, int MF>
DMA_DEVICE void warp_mma(float (&c)[MF][NT][4], const typename E::T* a, int lda,
                         const typename E::T* b, int ldb) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (E::TENSOR) {
        static_assert(A_KC && NT % 2 == 0, "tensor-core path: A k-contiguous, even NT");
#pragma unroll
        for (int k0 = 0; k0 < K; k0 += 16) {
            unsigned af[MF][4];  // rows 0-7 / 8-15 by k 0-7 / 8-15 of this 16x16 step
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
                ldmatrix_x4<false>(af[mf], a + (16 * mf + (lane & 15)) * lda + k0
                                               + (lane >> 4) * 8);
            mma_step<E, MF, NT, B_KC>(c, af, b, ldb, k0);
        }
    } else {
#pragma unroll 4
        for (int k = 0; k < K; ++k) {
#pragma unroll
            for (int mf = 0; mf < MF; ++mf) {
                const float a0 = operand_at<A_KC>(a, lda, 16 * mf + g, k);
                const float a1 = operand_at<A_KC>(a, lda, 16 * mf + g + 8, k);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float b0 = operand_at<B_KC>(b, ldb, nt * 8 + 2 * t, k);
                    const float b1 = operand_at<B_KC>(b, ldb, nt * 8 + 2 * t + 1, k);
                    c[mf][nt][0] += a0 * b0;
                    c[mf][nt][1] += a0 * b1;
                    c[mf][nt][2] += a1 * b0;
                    c[mf][nt][3] += a1 * b1;
                }
            }
        }
    }
}

template <class E, int K, int NT, bool A_KC, bool B_KC>
DMA_DEVICE void warp_mma(float (&c)[NT][4], const typename E::T* a, int lda,
                         const typename E::T* b, int ldb) {
    warp_mma<E, K, NT, A_KC, B_KC, 1>(reinterpret_cast<float (&)[1][NT][4]>(c), a, lda, b, ldb);
}

// c[16 MF x 8 NT] += F[16 MF x 16 KT/2] * B, where F is a score-shaped tile still in registers
// in the accumulator layout above (f[mf][kt][e]: KT column tiles of 8). For tensor-core types
// the C layout of two adjacent column tiles is exactly mma.sync's A layout of one 16-wide
// step, so F never touches shared memory; float32 stages it through `scratch` (16 MF rows).
template <class E, int KT, int NT, bool B_KC, int MF>
DMA_DEVICE void warp_mma_scores(float (&c)[MF][NT][4], const float (&f)[MF][KT][4],
                                typename E::T* scratch, int ld_scratch,
                                const typename E::T* b, int ldb) {
    if constexpr (E::TENSOR) {
        static_assert(KT % 2 == 0 && NT % 2 == 0, "16-wide steps, pairs of column tiles");
#pragma unroll
        for (int kt = 0; kt < KT; kt += 2) {
            unsigned af[MF][4];
#pragma unroll
            for (int mf = 0; mf < MF; ++mf) pack_k_step<E>(af[mf], f[mf][kt], f[mf][kt + 1]);
            mma_step<E, MF, NT, B_KC>(c, af, b, ldb, kt * 8);
        }
    } else {
        __syncwarp();  // the warp's previous reads of scratch are done
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
#pragma unroll
            for (int kt = 0; kt < KT; ++kt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    scratch[(16 * mf + frag_row(e)) * ld_scratch + frag_col(kt, e)] =
                        f[mf][kt][e];
        __syncwarp();
        warp_mma<E, KT * 8, NT, true, B_KC, MF>(c, scratch, ld_scratch, b, ldb);
    }
}

template <class E, int KT, int NT, bool B_KC>
DMA_DEVICE void warp_mma_scores(float (&c)[NT][4], const float (&f)[KT][4],
                                typename E::T* scratch, int ld_scratch,
                                const typename E::T* b, int ldb) {
    warp_mma_scores<E, KT, NT, B_KC, 1>(reinterpret_cast<float (&)[1][NT][4]>(c),
                                        reinterpret_cast<const float (&)[1][KT][4]>(f),
                                        scratch, ld_scratch, b, ldb);
}

template <int NT>
DMA_DEVICE void zero(float (&c)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
}
template <int MF, int NT>
DMA_DEVICE void zero(float (&c)[MF][NT][4]) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) zero(c[mf]);
}


// Sum over the four lanes that share an accumulator row.
DMA_DEVICE float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
DMA_DEVICE float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// ---------------------------------------------------------------------------------------
// Tile loads: ROWS rows of one head's (seq, dim) slice into shared memory (row stride
// D_PAD + SMEM_PAD). Row r is ids[r] (gathered candidate keys; negative = absent) or, with
// ids == nullptr, first + r (absent at or past `limit`). Absent rows and dims past head_dim
// read 0. With p.vector_loads (host-checked: 16-byte aligned rows, head_dim a multiple of
// the vector) each thread moves 16 bytes at a time, asynchronously.
// cp.async bookkeeping: close the group of copies issued so far; wait until at most N groups
// are still in flight.
DMA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
DMA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// With WAIT = false the copies are left in flight as one committed group: the caller waits
// (cp_async_wait) before the barrier that publishes the tile.
// The fallback for rows that are not whole aligned vectors: element by element, synchronous.
// Kept out of line: it is rare, and inlined at every tile load it would crowd the hot loops
// out of the instruction cache.
template <class E, int ROWS, int D_PAD, int THREADS>
__device__ __noinline__ void load_tile_elements(typename E::T* dst, const typename E::T* base,
                                                long long row_stride, const int* ids,
                                                long long first, long long limit, int head_dim) {
    constexpr int LD = D_PAD + SMEM_PAD;
    for (int i = threadIdx.x; i < ROWS * D_PAD; i += THREADS) {
        const int r = i / D_PAD, d = i % D_PAD;
        const long long row = ids ? ids[r] : first + r;
        const bool ok = (ids ? row >= 0 : row < limit) && d < head_dim;
        dst[r * LD + d] = ok ? base[row * row_stride + d] : E::from_f32(0.f);
    }
}

template <class E, int ROWS, int D_PAD, int THREADS, bool WAIT = true>
DMA_DEVICE void load_tile(typename E::T* dst, const typename E::T* base, long long row_stride,
                          const int* ids, long long first, long long limit,
                          const Params& p) {
    typedef typename E::T T;
    constexpr int LD = D_PAD + SMEM_PAD;
    constexpr int VEC = 16 / sizeof(T);
    if (p.vector_loads) {
        constexpr int CHUNKS = D_PAD / VEC;
        // Asynchronous copies straight into shared memory; absent rows copy 0 bytes and
        // zero-fill their 16.
        for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
            const int r = i / CHUNKS, d = (i % CHUNKS) * VEC;
            const long long row = ids ? ids[r] : first + r;
            const bool ok = (ids ? row >= 0 : row < limit) && d < p.head_dim;
            const T* src = ok ? base + row * row_stride + d : base;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                         :: "r"(shared_address(dst + r * LD + d)), "l"(src), "r"(ok ? 16 : 0));
        }
        cp_async_commit();
        if (WAIT) cp_async_wait<0>();
    } else {
        load_tile_elements<E, ROWS, D_PAD, THREADS>(dst, base, row_stride, ids, first, limit,
                                                    (int)p.head_dim);
    }
}

// Key id of slot `start + i` of a tile: an entry of a candidate list, a key of the listed
// live tile (tile_list: the list holds tiles of BLOCK_N keys), or consecutive keys below
// `limit`; -1 past the end.
template <int BLOCK_N>
DMA_DEVICE int key_tile_id(const Params& p, const int* list, long long start, int i,
                           long long limit) {
    const long long slot = start + i;
    if (slot >= limit) return -1;
    if (!list) return (int)slot;
    if (!p.tile_list) return list[slot];
    const long long key = (long long)list[start / BLOCK_N] * BLOCK_N + i;
    return key < p.seqlen_k ? (int)key : -1;
}

// A block's list: its candidate keys, or its live tiles (tile_list; per mask head).
DMA_DEVICE const int* candidate_list(const Params& p, long long b, long long h,
                                     long long block) {
    return static_cast<const int*>(p.candidates) + b * p.scand_b + (h / p.plan_hdiv) * p.scand_h
           + block * p.scand_blk;
}

// The list of a forward or dq program's query block, or null when it walks consecutive keys.
DMA_DEVICE const int* query_block_list(const Params& p, long long b, long long h,
                                       long long row0) {
    return p.interval || p.tile_list ? candidate_list(p, b, h, row0 / p.plan_block) : nullptr;
}

// Entry `block` of one of the per-block counts (candidate_count, full_count: the same
// strides).
DMA_DEVICE long long block_count(const Params& p, const void* counts, long long b, long long h,
                                 long long block) {
    return static_cast<const int*>(counts)[b * p.scnt_b + (h / p.plan_hdiv) * p.scnt_h + block];
}

// How many key slots a query block walks: its candidate count, its live tiles' keys, or its
// causal limit.
template <int BLOCK_N>
DMA_DEVICE long long tile_count(const Params& p, long long b, long long h, long long row0,
                                int block_m) {
    if (p.interval) return block_count(p, p.candidate_count, b, h, row0 / p.plan_block);
    if (p.tile_list)
        return block_count(p, p.candidate_count, b, h, row0 / p.plan_block) * BLOCK_N;
    long long n = p.seqlen_k;
    if (p.causal) {
        const long long last_row = lmin(row0 + block_m, p.seqlen_q) - 1;
        n = lmax(lmin(p.seqlen_k, last_row + p.causal_offset + 1), 0);
    }
    return n;
}

// How many of an explicit mask's listed tiles, those it lists first, every row keeps: the
// tiles that the mask and causality allow whole, unless key padding or attn_bias still
// need the per-pair test there (which also keeps attn_bias loads inside the rows).
DMA_DEVICE long long listed_whole_tiles(const Params& p, long long b, long long h,
                                        long long block) {
    return p.has_pad || p.has_ab ? 0 : block_count(p, p.full_count, b, h, block);
}

// How many of those slots every row of the block keeps, so that their tiles skip the
// per-pair test (only whole tiles below this count do): the plan's fully kept candidates,
// which it lists first; an explicit mask's whole live tiles (listed_whole_tiles);
// otherwise the keys at or left of the block's first causal diagonal when nothing else
// masks them. Rows past seqlen_q see such tiles as kept too; their outputs are never
// written and the backward's p is 0 there (row_stats).
template <int BLOCK_N>
DMA_DEVICE long long full_tile_slots(const Params& p, long long b, long long h, long long row0) {
    if (p.interval) return block_count(p, p.full_count, b, h, row0 / p.plan_block);
    if (p.tile_list) return listed_whole_tiles(p, b, h, row0 / p.plan_block) * BLOCK_N;
    if (p.has_pad || p.has_am || p.has_ab) return 0;
    return p.causal ? lmax(lmin(p.seqlen_k, row0 + p.causal_offset + 1), 0) : p.seqlen_k;
}

// The inputs of one (batch, head)'s scores, with base pointers resolved once per program so
// that no per-element index arithmetic divides. Absent inputs are null.
template <class E>
struct ScoreInputs {
    typedef typename E::T T;
    const T* key_bias;                // key_bias[key]
    const T* attn_bias;               // attn_bias[row * sab_r + key * sab_c]
    const unsigned char* attn_mask;   // attn_mask[row * sam_r + key * sam_c]
    const unsigned char* padding;     // padding[key]
    const int* end_row;               // plan: rows [causal start, end_row) keep key
    long long sab_r, sab_c, sam_r, sam_c;
    int seqlen_q, causal_offset;
    bool causal;
    // Scores run in base 2 (log2(e) * s of SPEC section 2), so softmax needs a bare exp2:
    // qk * scale_log2 without softcap, softcap_log2 * tanh(qk * scale_over_cap) with it.
    float scale_log2, scale_over_cap, softcap_log2;

    DMA_DEVICE ScoreInputs(const Params& p, long long b, long long h)
        : key_bias(p.has_kb ? static_cast<const T*>(p.key_bias) + b * p.skb_b
                                  + (h / p.kb_hdiv) * p.skb_h : nullptr),
          attn_bias(p.has_ab ? static_cast<const T*>(p.attn_bias) + b * p.sab_b
                                   + (h / p.ab_hdiv) * p.sab_h : nullptr),
          attn_mask(p.has_am ? static_cast<const unsigned char*>(p.attn_mask) + b * p.sam_b
                                   + (h / p.am_hdiv) * p.sam_h : nullptr),
          padding(p.has_pad ? static_cast<const unsigned char*>(p.padding) + b * p.spad_b
                                : nullptr),
          end_row(p.interval ? static_cast<const int*>(p.end_row) + b * p.splan_b
                                   + (h / p.plan_hdiv) * p.splan_h : nullptr),
          sab_r(p.sab_r), sab_c(p.sab_c), sam_r(p.sam_r), sam_c(p.sam_c),
          seqlen_q((int)p.seqlen_q), causal_offset((int)p.causal_offset), causal(p.causal),
          scale_log2((float)(p.scale * LOG2E)),
          scale_over_cap((float)(p.scale / p.softcap)),
          softcap_log2((float)(p.softcap * LOG2E)) {}
};

// What a score needs to know about one key, read once per tile (or per head) rather than per
// element. Every test that depends on the key alone folds into the row interval
// [first, end) that keeps it, so the per-element test is two comparisons. first is the
// causal start; end the plan's end row in the DMA case (a row's threshold never falls as
// rows see more keys, so a key that any row keeps is kept from the first row that sees it:
// the plan's key_first_row is never read), otherwise seqlen_q, or 0 for key padding.
struct KeyFacts {
    int id;  // -1: an absent slot (first = end = 0)
    int first, end;
    float bias;  // key_bias times log2(e)
};

template <class E>
DMA_DEVICE KeyFacts key_facts(const ScoreInputs<E>& in, int id) {
    KeyFacts f = {id, 0, 0, 0.f};
    if (id < 0) return f;
    if (in.key_bias) f.bias = E::to_f32(in.key_bias[id]) * LOG2E;
    f.first = in.causal ? id - in.causal_offset : 0;
    if (in.end_row) f.end = in.end_row[id];
    else f.end = in.padding && !in.padding[id] ? 0 : in.seqlen_q;
    return f;
}

// What a tile's scores test (chosen per tile by with_keep_test): nothing, for a tile that
// every row keeps (full_tile_slots); the keys' row intervals alone, when no attn_bias or
// attn_mask is given; or the intervals, attn_mask and attn_bias.
//
// Two compile-time choices shape the per-pair code as well:
// * SOFTCAP, a template parameter of every attention kernel (the launcher compiles each
//   kernel with and without one): the per-pair code has no branch on it, and without a
//   softcap a score is one fused multiply-add.
// * BRANCH_FREE: the interval test as two compares and a select, not as branches, where a
//   kernel's registers allow it (more freedom for the scheduler keeps more values live).
enum KeepTest { KEEP_ALL, KEEP_INTERVAL, KEEP_MASKS };
template <int TEST, bool SOFTCAP, bool BRANCH_FREE>
struct KeepTestTag {
    static constexpr int value = TEST;
    static constexpr bool softcap = SOFTCAP;
    static constexpr bool branch_free = BRANCH_FREE;
};

template <bool SOFTCAP, bool BRANCH_FREE, class E, class F>
DMA_DEVICE void with_keep_test(const ScoreInputs<E>& in, bool all_kept, F&& scores) {
    if (all_kept) scores(KeepTestTag<KEEP_ALL, SOFTCAP, BRANCH_FREE>());
    else if (in.attn_bias || in.attn_mask) scores(KeepTestTag<KEEP_MASKS, SOFTCAP, BRANCH_FREE>());
    else scores(KeepTestTag<KEEP_INTERVAL, SOFTCAP, BRANCH_FREE>());
}

// The score of (row, key) in base 2, -inf where row does not keep key (SPEC section 2), plus
// tanh(t / softcap) for the softcap gradient; Test is with_keep_test's tag.
template <class E, class Test>
DMA_DEVICE float masked_score(const ScoreInputs<E>& in, int row, const KeyFacts& key, float qk,
                              float& th) {
    float t;
    if constexpr (Test::softcap) {
        th = fast_tanh(qk * in.scale_over_cap);
        t = in.softcap_log2 * th + key.bias;
    } else {
        th = 0.f;
        t = qk * in.scale_log2 + key.bias;
    }
    if (Test::value == KEEP_ALL) return t;
    // row < end <= seqlen_q: a real row
    bool keep = Test::branch_free ? (key.first <= row) & (row < key.end)
                                  : key.first <= row && row < key.end;
    if (Test::value == KEEP_MASKS) {
        if (in.attn_bias && keep)
            t += E::to_f32(in.attn_bias[row * in.sab_r + key.id * in.sab_c]) * LOG2E;
        if (in.attn_mask && keep) keep = in.attn_mask[row * in.sam_r + key.id * in.sam_c] != 0;
    }
    return keep ? t : neg_inf();
}
