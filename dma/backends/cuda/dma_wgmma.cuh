// Hopper building blocks (sm_90a) for the warpgroup kernels in dma_attention.cuh: shared tiles
// in the 128-byte swizzled layout that warpgroup products read, a producer warpgroup's copies
// into them and the barriers it shares with the warpgroups that compute, the tiles'
// descriptors, and the products themselves (wgmma.mma_async, fp32 accumulation).
//
// A warpgroup is four warps; its m64nNk16 product multiplies 64 rows (warp w of the group
// owning rows 16w..16w + 15) by N columns. Its accumulator is, per warp, exactly the C layout
// of mma.sync (dma_common.cuh): d[nt][e] is row g + 8 * (e / 2), column 8 nt + 2 t + e % 2,
// so the score and softmax code of the mma.sync kernels reads it unchanged; and two adjacent
// column tiles of it, packed to 16 bits, are the register A operand of the next product.
//
// Everything here is inline PTX for sm_90a; the kernels that use it compile for that target
// only (the launcher compiles them with -arch=sm_90a) and trap elsewhere.
#pragma once
#include "dma_common.cuh"

// The warpgroup of this thread, as a value the compiler knows is the same across the warp
// (a broadcast from lane 0): descriptors built from it then stay in uniform registers,
// saving two instructions per product that a per-thread value costs to move there.
DMA_DEVICE int warpgroup_index() {
    return __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0);
}

// ---------------------------------------------------------------------------------------
// Swizzled tiles. A tile of ROWS rows of 16-bit elements is stored as panels of 64 columns
// (128 bytes a row), panel after panel; inside a panel the 16-byte chunk c of row r sits at
// chunk c ^ (r % 8), which spreads any column's 8 consecutive rows over all banks. Tiles
// start 1024-byte aligned (the swizzle repeats every 8 rows of 128 bytes).
constexpr int SWIZZLE_ROW_BYTES = 128;
constexpr int SWIZZLE_ATOM_BYTES = 8 * SWIZZLE_ROW_BYTES;

template <int ROWS>
DMA_DEVICE unsigned swizzled_offset(int row, int col) {
    const int chunk = (col % 64) / 8;
    return (col / 64) * ROWS * SWIZZLE_ROW_BYTES + row * SWIZZLE_ROW_BYTES
           + ((chunk ^ (row % 8)) * 16) + (col % 8) * 2;
}

// The shared-space address of a kernel's first swizzled tile: its dynamic shared memory
// rounded up to the swizzle's 1024 bytes (the launcher adds the slack).
DMA_DEVICE unsigned swizzled_tiles(const void* smem) {
    return (shared_address(smem) + SWIZZLE_ATOM_BYTES - 1) & ~(unsigned)(SWIZZLE_ATOM_BYTES - 1);
}

// Copies of one ROWS-row tile by ROWS / 32 warps of a producer warpgroup (one thread per
// row): warp w copies rows 32 (w % (ROWS / 32)) on, 32 of them, whose ids its lanes hold
// (lane i: the warp's row i; negative: absent, zero-filled, as are columns at or past
// head_dim) and pass along the warp by shuffles. Each step copies 32 / CHUNKS whole rows,
// one 16-byte chunk per lane. A row's address is one 32 x 64-bit multiply-add: absent rows
// and columns read nothing but still point at row 0, column 0. Not committed: the caller
// arrives on the tile's barrier when the copies land (mbarrier_arrive_on_copies).
template <class E, int ROWS, int D_PAD>
DMA_DEVICE void copy_rows_of_lanes(unsigned dst, const typename E::T* base, long long row_stride,
                                   int id, int head_dim) {
    constexpr int CHUNKS = D_PAD / 8, ROWS_PER_STEP = 32 / CHUNKS;
    static_assert(ROWS % 32 == 0 && ROWS <= 128, "whole warps of a producer warpgroup");
    const int lane = threadIdx.x % 32, warp_row0 = (int)(threadIdx.x / 32 % (ROWS / 32)) * 32;
    const int col = (lane % CHUNKS) * 8;
    const bool col_ok = col < head_dim;
    const char* first = reinterpret_cast<const char*>(base + (col_ok ? col : 0));
    const unsigned long long row_bytes = (unsigned long long)row_stride * sizeof(*base);
    // Unrolled by the swizzle's period of 8 rows: the XOR pattern repeats, the producer's
    // few registers hold one period's offsets.
#pragma unroll 8 / ROWS_PER_STEP
    for (int step = 0; step < CHUNKS; ++step) {
        const int from = step * ROWS_PER_STEP + lane / CHUNKS;  // the lane holding the row id
        const int row_id = __shfl_sync(0xffffffffu, id, from);
        const bool ok = row_id >= 0 && col_ok;
        const char* src = first + (unsigned)(row_id >= 0 ? row_id : 0) * row_bytes;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(dst + swizzled_offset<ROWS>(warp_row0 + from, col)), "l"(src),
                        "r"(ok ? 16 : 0));
    }
}

// ---------------------------------------------------------------------------------------
// Shared-memory matrix descriptor of a swizzled tile (128-byte swizzle): its start address,
// the byte stride between 64-column panels (`leading`: read only for an operand whose rows
// are the product's k dimension and whose N columns span several panels, as V in P V; the
// operands with k contiguous pass 16, by convention) and between 8-row groups (one swizzle
// atom). Each product's k step of 16 then starts 32 bytes further along a row (k
// contiguous) or 16 rows further down (rows along k).
//
// The high word is the same for every tile. The low word holds address / 16 in 14 bits and
// shared addresses stay below 2^18, so the descriptor of a place `bytes` further into a tile
// (a multiple of 16) is its low word plus bytes / 16: one add per product instead of
// masking and shifting each address anew.
constexpr unsigned DESCRIPTOR_HIGH = (SWIZZLE_ATOM_BYTES >> 4) | (1u << 30);  // 128-byte swizzle

DMA_DEVICE unsigned descriptor_low(unsigned address, unsigned leading) {
    return ((address & 0x3FFFF) >> 4) | ((leading >> 4) << 16);
}

DMA_DEVICE unsigned long long descriptor_at(unsigned low, unsigned bytes) {
    return ((unsigned long long)DESCRIPTOR_HIGH << 32) | (low + (bytes >> 4));
}

// Ordering of the asynchronous products: `wgmma_fence` before a product reads registers that
// other instructions wrote (its accumulator, a register A operand); `commit` closes the group
// of products issued so far, `wait` blocks until at most N groups are in flight. Shared tiles
// written by ordinary stores or cp.async must pass `fence_async_shared` (then a barrier)
// before a product reads them.
DMA_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DMA_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
DMA_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}
DMA_DEVICE void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// Barriers in shared memory (mbarrier) between a producer warpgroup, which copies tiles, and
// the warpgroups that compute on them. A barrier completes a phase once `count` arrivals
// happened, and starts the next; waits name the phase by its parity (the n-th use of a
// barrier waits for parity n % 2; a wait for the parity before a fresh barrier's first phase
// passes at once, so a producer's first wait on a free buffer does not block).
// Arrivals release and waits acquire (CTA scope): stores before an arrival are seen after
// the wait. `mbarrier_arrive_on_copies` arrives once this thread's cp.async copies so far
// have landed (one of `count`, not waited for here). Copies land in the generic proxy and
// products read through the async proxy, so a consumer fences (fence_async_shared) after
// its wait and before its products.
DMA_DEVICE void mbarrier_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
DMA_DEVICE void mbarrier_arrive(unsigned bar) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }"
                 :: "r"(bar) : "memory");
}
DMA_DEVICE void mbarrier_arrive_on_copies(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
DMA_DEVICE void mbarrier_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// The two barriers of one buffer of a ring that a producer fills and consumers read: `full`
// completes when the producer's copies (and whatever it stages beside them) landed, `free`
// when every consumer warp handed the buffer back. Tile t of a ring of n buffers sits in
// buffer t % n for the (t / n)-th time, the parity of the phases its barriers complete.
struct BufferBarriers {
    unsigned long long full, free;
};

DMA_DEVICE unsigned use_parity(long long t, int buffers) { return (unsigned)(t / buffers) & 1u; }

DMA_DEVICE void init_buffer(BufferBarriers& b, unsigned full_arrivals, unsigned free_arrivals) {
    mbarrier_init(shared_address(&b.full), full_arrivals);
    mbarrier_init(shared_address(&b.free), free_arrivals);
}

// Producer: wait until the buffer is free for its (t / n)-th use (the first passes at once).
DMA_DEVICE void wait_until_free(const BufferBarriers& b, unsigned parity) {
    mbarrier_wait(shared_address(&b.free), parity ^ 1u);
}

// Consumer: wait until the buffer's copies landed, then let products read it.
DMA_DEVICE void wait_for_copies(const BufferBarriers& b, unsigned parity) {
    mbarrier_wait(shared_address(&b.full), parity);
    fence_async_shared();
}

// Consumer warp: hand the buffer back once every lane's reads of it are done.
DMA_DEVICE void hand_back(const BufferBarriers& b) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(shared_address(&b.free));
}

// Producer warp: one arrival on the buffer's `full` once every lane's stores are done.
DMA_DEVICE void warp_arrive(const BufferBarriers& b) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(shared_address(&b.full));
}

// A barrier of the THREADS threads (whole warps) that use barrier ID (0 is __syncthreads'):
// the producer's or the consumers' own, where the two run different code.
template <int ID, int THREADS>
DMA_DEVICE void named_barrier() {
    asm volatile("bar.sync %0, %1;" :: "n"(ID), "n"(THREADS) : "memory");
}

// Registers per thread of a warpgroup from here on (every warp of the group runs it): a
// producer gives registers back so that the groups that compute can take more.
template <int N>
DMA_DEVICE void warpgroup_registers_down() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(N));
}
template <int N>
DMA_DEVICE void warpgroup_registers_up() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(N));
}

// The compiler sees a product's accumulator written when the product is issued; this keeps
// every later read of it behind the wait (an empty asm on each register, ordered after the
// wait's).
template <int NT>
DMA_DEVICE void hold_accumulator(float (&d)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[nt][e]) :: "memory");
}

// The accumulator operands of one product, eight registers (two column tiles) at a time.
#define DMA_ACC2(d, nt)                                                                   \
    "+f"(d[nt][0]), "+f"(d[nt][1]), "+f"(d[nt][2]), "+f"(d[nt][3]), "+f"(d[nt + 1][0]),   \
        "+f"(d[nt + 1][1]), "+f"(d[nt + 1][2]), "+f"(d[nt + 1][3])
#define DMA_ACC8(d, nt) \
    DMA_ACC2(d, nt), DMA_ACC2(d, nt + 2), DMA_ACC2(d, nt + 4), DMA_ACC2(d, nt + 6)
#define DMA_REGS32                                                                        \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
    "%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define DMA_REGS64                                                                        \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
    "%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,"  \
    "%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

// One warpgroup product for E's 16-bit type: `shape`, its accumulator registers `regs`, the
// rest of its operands `ops`, its scale-d predicate from operand `pred` (0: overwrite d), and
// the asm's operand lists.
#define DMA_WGMMA_ASM(type, shape, regs, ops, pred, ...)                                  \
    asm volatile("{ .reg .pred p; setp.ne.b32 p, " pred ", 0;\n"                          \
                 "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " " regs ", "  \
                 ops "; }" __VA_ARGS__)
#define DMA_WGMMA(E, shape, regs, ops, pred, ...)                                         \
    if constexpr (E::BF16_BITS) DMA_WGMMA_ASM("bf16", shape, regs, ops, pred, __VA_ARGS__); \
    else DMA_WGMMA_ASM("f16", shape, regs, ops, pred, __VA_ARGS__)

// d[64 x N] (+)= A[64 x 16] B[16 x N], A and B both in shared memory with k contiguous
// (as Q and K): the score product. `accumulate` false overwrites d.
template <class E, int N>
DMA_DEVICE void wgmma_shared(float (&d)[N / 8][4], unsigned long long a, unsigned long long b,
                             bool accumulate) {
    static_assert(N == 64 || N == 128, "score tiles of 64 or 128 keys");
    if constexpr (N == 64)
        DMA_WGMMA(E, "m64n64k16", DMA_REGS32, "%32, %33, p, 1, 1, 0, 0", "%34",
                  : DMA_ACC8(d, 0) : "l"(a), "l"(b), "r"((int)accumulate));
    else
        DMA_WGMMA(E, "m64n128k16", DMA_REGS64, "%64, %65, p, 1, 1, 0, 0", "%66",
                  : DMA_ACC8(d, 0), DMA_ACC8(d, 8) : "l"(a), "l"(b), "r"((int)accumulate));
}

// d[64 x N] += A[64 x 16] B[16 x N], A in registers (four 16-bit pairs in mma.sync's A
// layout) and B in shared memory with its N columns contiguous (as V in P V: rows are keys).
template <class E, int N>
DMA_DEVICE void wgmma_registers(float (&d)[N / 8][4], const unsigned (&a)[4],
                                unsigned long long b) {
    static_assert(N == 64 || N == 128, "head dims of 64 and 128");
    if constexpr (N == 64)
        DMA_WGMMA(E, "m64n64k16", DMA_REGS32, "{%32, %33, %34, %35}, %36, p, 1, 1, 1", "%37",
                  : DMA_ACC8(d, 0)
                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
    else
        DMA_WGMMA(E, "m64n128k16", DMA_REGS64, "{%64, %65, %66, %67}, %68, p, 1, 1, 1", "%69",
                  : DMA_ACC8(d, 0), DMA_ACC8(d, 8)
                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
#undef DMA_WGMMA
#undef DMA_WGMMA_ASM
#undef DMA_ACC2
#undef DMA_ACC8
#undef DMA_REGS32
#undef DMA_REGS64

// ---------------------------------------------------------------------------------------
// The products of the attention kernels, for one warpgroup's 64 rows.

// d[64 x N] = A B^T over D_PAD: A is rows a_row0.. of a swizzled A_ROWS-row tile, B a
// swizzled N-row tile, both with the D_PAD dims contiguous (Q K^T, dO V^T). Issued, not
// committed.
template <class E, int D_PAD, int A_ROWS, int N>
DMA_DEVICE void wgmma_rows_by_rows(float (&d)[N / 8][4], unsigned a_tile, int a_row0,
                                   unsigned b_tile) {
    const unsigned a = descriptor_low(a_tile + a_row0 * SWIZZLE_ROW_BYTES, 16);
    const unsigned b = descriptor_low(b_tile, 16);
#pragma unroll
    for (int ks = 0; ks < D_PAD / 16; ++ks) {
        const unsigned panel = ks / 4, within = (ks % 4) * 32;  // four k steps per panel
        wgmma_shared<E, N>(d, descriptor_at(a, panel * A_ROWS * SWIZZLE_ROW_BYTES + within),
                           descriptor_at(b, panel * N * SWIZZLE_ROW_BYTES + within), ks > 0);
    }
}

// A whole accumulator as the register A operand of the next product: each two adjacent
// column tiles (16 columns) are one k step (pack_k_step).
template <class E, int NT>
DMA_DEVICE void pack_operand(unsigned (&a)[NT / 2][4], const float (&f)[NT][4]) {
#pragma unroll
    for (int kt = 0; kt < NT / 2; ++kt) pack_k_step<E>(a[kt], f[2 * kt], f[2 * kt + 1]);
}

// d[64 x D_PAD] += A B over K: A in registers (pack_operand), B a swizzled K-row tile with
// its D_PAD columns contiguous (P V, dS K): each k step of 16 starts 16 rows further down.
// Issued, not committed.
template <class E, int D_PAD, int K>
DMA_DEVICE void wgmma_registers_by_rows(float (&d)[D_PAD / 8][4], const unsigned (&a)[K / 16][4],
                                        unsigned b_tile) {
    const unsigned b = descriptor_low(b_tile, K * SWIZZLE_ROW_BYTES);
#pragma unroll
    for (int kt = 0; kt < K / 16; ++kt)
        wgmma_registers<E, D_PAD>(d, a[kt], descriptor_at(b, kt * 16 * SWIZZLE_ROW_BYTES));
}
