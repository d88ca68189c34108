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
DMA_DEVICE long long lmin(long long a, long long b) { return a < b ? a : b; }
DMA_DEVICE long long lmax(long long a, long long b) { return a > b ? a : b; }

constexpr float LOG2E = 1.4426950408889634f;
constexpr int SMEM_PAD = 8;  // elements added to each shared-memory row against bank conflicts

struct alignas(16) Vec16 {  // one 16-byte load or store
    unsigned x, y, z, w;
};

// ---------------------------------------------------------------------------------------
// Element types. Tensor-core types run mma.sync m16n8k16 (fp32 accumulation); float32 runs
// the same fragment layout with scalar FMAs, so it stays IEEE float32 end to end.
struct F16 {
    typedef unsigned short T;
    static constexpr bool TENSOR = true;
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

struct F32 {
    typedef float T;
    static constexpr bool TENSOR = false;
    static DMA_DEVICE float to_f32(T x) { return x; }
    static DMA_DEVICE T from_f32(float f) { return f; }
};

// ---------------------------------------------------------------------------------------
// Warp-level product on shared-memory tiles: c[16 x 8*NT] += A[16 x K] * B[K x 8*NT].
// A(i, k) is a[i * lda + k] when A_KC (k contiguous) else a[k * lda + i]; B(k, j) is
// b[j * ldb + k] when B_KC else b[k * ldb + j]. Lane (g = lane / 4, t = lane % 4) owns the
// accumulator elements of mma.sync's C layout: c[nt][e] is row g + 8 * (e / 2), column
// nt * 8 + 2 * t + e % 2. Every kernel reads its scores out of this layout.
template <bool KC, class T>
DMA_DEVICE T operand_at(const T* p, int ld, int outer, int k) {
    return KC ? p[outer * ld + k] : p[k * ld + outer];
}

template <bool KC>
DMA_DEVICE unsigned operand_pair(const unsigned short* p, int ld, int outer, int k) {
    if (KC) return *reinterpret_cast<const unsigned*>(p + outer * ld + k);
    return (unsigned)p[k * ld + outer] | ((unsigned)p[(k + 1) * ld + outer] << 16);
}

template <class E, int K, int NT, bool A_KC, bool B_KC>
DMA_DEVICE void warp_mma(float (&c)[NT][4], const typename E::T* a, int lda,
                         const typename E::T* b, int ldb) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (E::TENSOR) {
#pragma unroll
        for (int k0 = 0; k0 < K; k0 += 16) {
            const int k = k0 + 2 * t;
            const unsigned af[4] = {operand_pair<A_KC>(a, lda, g, k),
                                    operand_pair<A_KC>(a, lda, g + 8, k),
                                    operand_pair<A_KC>(a, lda, g, k + 8),
                                    operand_pair<A_KC>(a, lda, g + 8, k + 8)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const unsigned bf[2] = {operand_pair<B_KC>(b, ldb, nt * 8 + g, k),
                                        operand_pair<B_KC>(b, ldb, nt * 8 + g, k + 8)};
                E::mma(c[nt], af, bf);
            }
        }
    } else {
#pragma unroll 4
        for (int k = 0; k < K; ++k) {
            const float a0 = operand_at<A_KC>(a, lda, g, k);
            const float a1 = operand_at<A_KC>(a, lda, g + 8, k);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float b0 = operand_at<B_KC>(b, ldb, nt * 8 + 2 * t, k);
                const float b1 = operand_at<B_KC>(b, ldb, nt * 8 + 2 * t + 1, k);
                c[nt][0] += a0 * b0;
                c[nt][1] += a0 * b1;
                c[nt][2] += a1 * b0;
                c[nt][3] += a1 * b1;
            }
        }
    }
}

template <int NT>
DMA_DEVICE void zero(float (&c)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
}

// Row (within the warp's 16) and column of accumulator element e of tile nt.
DMA_DEVICE int frag_row(int e) { return ((threadIdx.x & 31) >> 2) + 8 * (e >> 1); }
DMA_DEVICE int frag_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x & 3) + (e & 1); }

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
// the vector) each thread moves 16 bytes at a time.
template <class E, int ROWS, int D_PAD, int THREADS>
DMA_DEVICE void load_tile(typename E::T* dst, const typename E::T* base, long long row_stride,
                          const long long* ids, long long first, long long limit,
                          const Params& p) {
    typedef typename E::T T;
    constexpr int LD = D_PAD + SMEM_PAD;
    constexpr int VEC = 16 / sizeof(T);
    if (p.vector_loads) {
        constexpr int CHUNKS = D_PAD / VEC;
        for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
            const int r = i / CHUNKS, d = (i % CHUNKS) * VEC;
            const long long row = ids ? ids[r] : first + r;
            const bool ok = (ids ? row >= 0 : row < limit) && d < p.head_dim;
            Vec16 val = {0u, 0u, 0u, 0u};
            if (ok) val = *reinterpret_cast<const Vec16*>(base + row * row_stride + d);
            *reinterpret_cast<Vec16*>(dst + r * LD + d) = val;
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * D_PAD; i += THREADS) {
            const int r = i / D_PAD, d = i % D_PAD;
            const long long row = ids ? ids[r] : first + r;
            const bool ok = (ids ? row >= 0 : row < limit) && d < p.head_dim;
            dst[r * LD + d] = ok ? base[row * row_stride + d] : E::from_f32(0.f);
        }
    }
}

// Key ids of one tile: slots start..start+BLOCK_N of a candidate list, or consecutive keys
// below `limit`. Absent slots get -1.
template <int BLOCK_N>
DMA_DEVICE void key_tile_ids(long long* ids, const int* candidates, long long start,
                             long long limit) {
    for (int i = threadIdx.x; i < BLOCK_N; i += blockDim.x) {
        const long long slot = start + i;
        ids[i] = slot >= limit ? -1 : (candidates ? (long long)candidates[slot] : slot);
    }
}

// How many key slots a query block walks: its candidate count, or its causal limit.
DMA_DEVICE long long tile_count(const Params& p, long long b, long long h, long long row0,
                                int block_m) {
    if (p.interval) {
        const int* count = static_cast<const int*>(p.candidate_count);
        return count[b * p.scnt_b + (h / p.plan_hdiv) * p.scnt_h + row0 / p.plan_block];
    }
    long long n = p.seqlen_k;
    if (p.causal) {
        const long long last_row = lmin(row0 + block_m, p.seqlen_q) - 1;
        n = lmax(lmin(p.seqlen_k, last_row + p.causal_offset + 1), 0);
    }
    return n;
}

DMA_DEVICE const int* candidate_list(const Params& p, long long b, long long h,
                                     long long block) {
    return static_cast<const int*>(p.candidates) + b * p.scand_b + (h / p.plan_hdiv) * p.scand_h
           + block * p.scand_blk;
}

// The score of (row, key) and whether row keeps key (-inf where not), plus tanh(t / softcap)
// for the softcap gradient. `key` < 0 marks an absent slot.
template <class E>
DMA_DEVICE float masked_score(const Params& p, long long b, long long h, long long row,
                              long long key, float qk, float& th) {
    typedef typename E::T T;
    float t = qk * (float)p.scale;
    th = t;
    if (p.has_softcap) {
        th = tanhf(t / (float)p.softcap);
        t = (float)p.softcap * th;
    }
    bool keep = row < p.seqlen_q && key >= 0;
    if (!keep) return neg_inf();
    if (p.has_kb)
        t += E::to_f32(static_cast<const T*>(p.key_bias)[b * p.skb_b + (h / p.kb_hdiv) * p.skb_h
                                                         + key]);
    if (p.has_ab)
        t += E::to_f32(static_cast<const T*>(p.attn_bias)[
            b * p.sab_b + (h / p.ab_hdiv) * p.sab_h + row * p.sab_r + key * p.sab_c]);
    if (p.interval) {
        const long long at = b * p.splan_b + (h / p.plan_hdiv) * p.splan_h + key;
        keep = static_cast<const int*>(p.first_row)[at] <= row
               && row < static_cast<const int*>(p.end_row)[at];
    } else {
        if (p.causal) keep = key <= row + p.causal_offset;
        if (keep && p.has_am)
            keep = static_cast<const unsigned char*>(p.attn_mask)[
                       b * p.sam_b + (h / p.am_hdiv) * p.sam_h + row * p.sam_r
                       + key * p.sam_c] != 0;
        if (keep && p.has_pad)
            keep = static_cast<const unsigned char*>(p.padding)[b * p.spad_b + key] != 0;
    }
    return keep ? t : neg_inf();
}
