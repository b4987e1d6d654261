// CPU kernels for decode-sized passes (a few tokens): the skinny GEMM, RMSNorm, SiLU-and-multiply
// and paged attention with rotary embedding, so that a decoder layer is seven calls. The paged
// attention also takes wide passes (prefill chunks), whose matrix products stay on torch's GEMM.
//
// Why: between two weight-streaming matmuls, every small torch op pays tens of microseconds
// (its code and data were evicted by the weights), so a layer of thirty small ops costs as much
// as a third of the weights' read time. These kernels are short loops on the calling thread,
// except the GEMM, which splits weight rows between threads.
//
// Skinny fp32 GEMM: out[M, N] = x[M, K] @ w[N, K]^T with M small.
//
// Decode (M = 1) and speculative verification (M = a few draft tokens per sequence) are bound by
// reading the weights, not by arithmetic. A BLAS sgemm picks blocked kernels for M > 1 that read
// the weights more than once and runs M = 4 at about twice the cost of M = 1 on a 2-core AVX-512
// host. Here each weight row is streamed once per tile of rows and reused from L1 for every token.
//
// Every output element is computed by the same sequence of operations whatever M is and however
// the rows are split between threads: 16-wide fused multiply-adds along K in order, a fixed-order
// reduction, then the scalar tail. So a token's logits do not depend on how many other tokens
// share its pass, which keeps speculative verification bitwise equal to plain decoding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }

// fp16 weights (a draft head's): converted exactly to fp32 in registers, half the bytes to read
static inline v16 load16(const _Float16* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v16 out;
  __builtin_memcpy(&out, &f, sizeof(out));
  return out;
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  v16 out;
  __builtin_memcpy(&out, &lo, 32);
  __builtin_memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  v16 out;
  for (int i = 0; i < 16; ++i) out[i] = float(p[i]);
  return out;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// reduce16's tree on a 16-lane sum kept as two 8-lane halves (lanes 0-7 and 8-15)
static inline float reduce_halves(__m256 lo, __m256 hi) {
  const __m256 t8 = _mm256_add_ps(lo, hi);
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  const __m128 u = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}
#endif

// A fixed-order sum of 16 lanes: halves, quarters, then (0 + 2) + (1 + 3). The AVX-512 path is the
// same tree in registers (a + b is commutative bitwise): through a stack array the compiler ran it
// as scalar adds, about a fifth of a 6-token pass's time in the skinny GEMM.
static inline float reduce16(v16 a) {
#if defined(__AVX512F__)
  __m512 z;
  __builtin_memcpy(&z, &a, sizeof(z));
  const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(z),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  const __m128 u = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));  // [t4[0] + t4[2], t4[1] + t4[3], ...]
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
#elif defined(__AVX2__)
  __m256 l8, h8;
  __builtin_memcpy(&l8, &a, 32);
  __builtin_memcpy(&h8, reinterpret_cast<const char*>(&a) + 32, 32);
  return reduce_halves(l8, h8);
#else
  float s[16];
  __builtin_memcpy(s, &a, sizeof(s));
  float t8[8], t4[4];
  for (int i = 0; i < 8; ++i) t8[i] = s[i] + s[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
#endif
}

// 4-bit weights, GGUF's Q4_1 blocks of 32 along K: element i of a block is d * q_i + m, d and m
// fp16, q_i in 0..15, low nibbles of qs holding elements 0-15 and high nibbles 16-31. Dequantized
// in registers to the exact fp32 values a converter writes (d * q is exact in fp32: 11 by 4
// significant bits, so fused or not, the one rounding is that of the sum), a fifth of fp32's bytes.
struct Q4Block {
  _Float16 d, m;
  uint8_t qs[16];
};
static_assert(sizeof(Q4Block) == 20, "Q4_1 block is 20 bytes");
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int32_t vi16 __attribute__((vector_size(64)));

static inline void dequant(const Q4Block* b, v16& lo, v16& hi) {
#if defined(__AVX512F__)
  uint32_t dm;
  __builtin_memcpy(&dm, b, 4);
  const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(int(dm)));  // [d, m, 0, 0]
  const __m512 dv = _mm512_broadcastss_ps(dmf), mv = _mm512_broadcastss_ps(_mm_movehdup_ps(dmf));
  // the block's 16 possible values d * i + m, i = 0..15, in one multiply-add; each weight is then
  // a lane of that table picked by its nibble (vpermps reads an index's low 4 bits)
  const __m512 table = _mm512_fmadd_ps(dv, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), mv);
  const __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs)));
  const __m512 l = _mm512_permutexvar_ps(qi, table);
  const __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(qi, 4), table);
  __builtin_memcpy(&lo, &l, sizeof(lo));
  __builtin_memcpy(&hi, &h, sizeof(hi));
#else
  u8x16 q;
  __builtin_memcpy(&q, b->qs, 16);
  const vi16 qi = __builtin_convertvector(q, vi16);
  const v16 dv = v16{} + float(b->d), mv = v16{} + float(b->m);
  lo = dv * __builtin_convertvector(qi & 15, v16) + mv;
  hi = dv * __builtin_convertvector(qi >> 4, v16) + mv;
#endif
}

// 8-bit weights, GGUF's Q8_0 blocks of 32 along K: element i is d * q_i, d fp16, q_i int8, exact
// in fp32 (11 by 8 significant bits), a quarter of fp32's bytes.
struct Q8Block {
  _Float16 d;
  int8_t qs[32];
};
static_assert(sizeof(Q8Block) == 34, "Q8_0 block is 34 bytes");

static inline void dequant(const Q8Block* b, v16& lo, v16& hi) {
#if defined(__AVX512F__)
  uint16_t dbits;
  __builtin_memcpy(&dbits, b, 2);
  const __m512 dv = _mm512_set1_ps(_cvtsh_ss(dbits));
  const __m512 l = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs)))));
  const __m512 h = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16)))));
  __builtin_memcpy(&lo, &l, sizeof(lo));
  __builtin_memcpy(&hi, &h, sizeof(hi));
#else
  const float d = float(b->d);
  for (int i = 0; i < 16; ++i) {
    lo[i] = d * float(b->qs[i]);
    hi[i] = d * float(b->qs[16 + i]);
  }
#endif
}

// The same Q4_1 blocks, four rows interleaved (via_sd_kernels/cpu/blocks.py `interleave_q4_1`):
// for rows 4g..4g+3 at one block along K, byte 4 i + r of `qs` is row r's byte i, so dword i holds
// element i of row r in its bits 8r..8r+3 and element 16 + i in bits 8r+4..8r+7; d and m are fp32.
// A row's dequantization is then a shift of the group's one 64-byte load and a permute per 16
// weights, from a table made of two broadcast loads and one multiply-add: no widening of bytes, no
// fp16 conversion, no shuffles to broadcast d and m. The values are the same fp32 numbers (d and m
// are fp16 values, exact in fp32; the table is the same d * i + m), so the sums are bitwise those
// of the GGUF layout. The bundled model's layers: 1-2-token passes 1.12-1.34x faster like this.
struct Q4x4 {
  uint8_t qs[64];
  float d[4], m[4];
};
static_assert(sizeof(Q4x4) == 96, "four interleaved Q4_1 blocks are 96 bytes");
struct Q4x4Ref {
  const Q4x4* g;
  int r;  // the row within the group
};

#if defined(__AVX512F__)
// row r of a group whose 64 quant bytes are loaded in v (the group tile below passes r as a
// constant, so its shifts are immediates)
static inline __attribute__((always_inline)) void dequant_row(const Q4x4* g, __m512i v, int r, v16& lo, v16& hi) {
  const __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(g->d[r]),
                                       _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_ps(g->m[r]));
  const __m512 l = _mm512_permutexvar_ps(_mm512_srli_epi32(v, unsigned(8 * r)), table);
  const __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(v, unsigned(8 * r + 4)), table);
  __builtin_memcpy(&lo, &l, sizeof(lo));
  __builtin_memcpy(&hi, &h, sizeof(hi));
}
#endif

static inline void dequant(const Q4x4Ref& b, v16& lo, v16& hi) {
#if defined(__AVX512F__)
  dequant_row(b.g, _mm512_loadu_si512(b.g->qs), b.r, lo, hi);
#else
  vi16 qi;
  for (int i = 0; i < 16; ++i) qi[i] = b.g->qs[4 * i + b.r];
  const v16 dv = v16{} + b.g->d[b.r], mv = v16{} + b.g->m[b.r];
  lo = dv * __builtin_convertvector(qi & 15, v16) + mv;
  hi = dv * __builtin_convertvector(qi >> 4, v16) + mv;
#endif
}

// where (row, block b) of a matrix of blocks is, KB blocks a row
template <typename W>
static inline const W* block_at(const W* w, int64_t row, int64_t b, int64_t KB) {
  return w + row * KB + b;
}
static inline Q4x4Ref block_at(const Q4x4* w, int64_t row, int64_t b, int64_t KB) {
  return {w + (row >> 2) * KB + b, int(row & 3)};
}
template <typename W>
static inline void prefetch_block(const W* w, int64_t row, int64_t b, int64_t KB) {
  __builtin_prefetch(w + row * KB + b, 0, 3);
}
static inline void prefetch_block(const Q4x4* w, int64_t row, int64_t b, int64_t KB) {
  const char* p = reinterpret_cast<const char*>(w + (row >> 2) * KB + b);
  __builtin_prefetch(p, 0, 3);
  __builtin_prefetch(p + sizeof(Q4x4) - 1, 0, 3);  // 96 bytes: two cache lines
}

template <typename W>
constexpr bool is_block_v = std::is_same_v<W, Q4Block> || std::is_same_v<W, Q8Block> || std::is_same_v<W, Q4x4>;

// A tile's last step for one output: the scalar tail past the 16-lane steps (fp32 and fp16
// weights; blocks have none), the residual, the store
template <typename W>
static inline void store_sum(float s, const float* x, const W* w, float* out, const float* res, int64_t K,
                             int64_t N, int64_t row, int64_t tok) {
  if constexpr (!is_block_v<W>) {
    const W* wr = w + row * K;
    const float* xr = x + tok * K;
    for (int64_t k = K & ~int64_t(15); k < K; ++k) s = __builtin_fmaf(float(wr[k]), xr[k], s);
  }
  const int64_t o = tok * N + row;
  out[o] = res ? res[o] + s : s;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define VIA_SD_AVX2_TILES 1
// AVX2 hosts (no AVX-512: many laptops, AMD before Zen 4). There a v16 is a pair of 8-lane
// registers and there are 16 of them, so the v16 tiles below (up to 32 v16 accumulators) spill to the
// stack on every multiply-add: measured on a Zen 3 host, a one-token pass over the bundled
// model's layers took 13.8 ms and a three-token one 63 ms. These tiles keep each v16 accumulator
// as its two halves and at most 12 halves in flight (4 rows x 1 token, 2 x 2, 1 x up to 6). Each
// lane gets the same fused multiply-adds in the same order as a v16 lane below (along K, 16
// weights at a time, the first 8 in the low half) and the same reduction (reduce16), so the sums
// are bitwise those of the v16 tiles, and independent of the pass's size and split as they are.
namespace avx2 {

// 8 weights of row `row` as fp32: chunk q (0-3) of block b (32 weights: q = 0, 1 weights 0-7 and
// 8-15, q = 2, 3 weights 16-23 and 24-31), or for fp32 / fp16 matrices the 8 at k = 8 q + 32 b
// 8 fp32 values, or 8 fp16 ones widened exactly
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const _Float16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename F>  // fp32 or fp16 weights
static inline __m256 chunk(const F* w, int64_t row, int64_t b, int q, int64_t K) {
  return load8(w + row * K + 32 * b + 8 * q);
}
// Q4_1: d * q + m in one multiply-add, d * q exact: the values dequant() gives
static inline __m256 chunk(const Q4Block* w, int64_t row, int64_t b, int q, int64_t K) {
  const Q4Block* blk = w + row * (K / 32) + b;
  uint32_t dm;
  __builtin_memcpy(&dm, blk, 4);
  const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(int(dm)));  // [d, m, 0, 0]
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk->qs + 8 * (q & 1))));
  const __m256i n = q < 2 ? _mm256_and_si256(v, _mm256_set1_epi32(15)) : _mm256_srli_epi32(v, 4);
  return _mm256_fmadd_ps(_mm256_broadcastss_ps(dmf), _mm256_cvtepi32_ps(n),
                         _mm256_broadcastss_ps(_mm_movehdup_ps(dmf)));
}
static inline __m256 chunk(const Q8Block* w, int64_t row, int64_t b, int q, int64_t K) {
  const Q8Block* blk = w + row * (K / 32) + b;
  uint16_t dbits;
  __builtin_memcpy(&dbits, blk, 2);
  return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(dbits)),
                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                           _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk->qs + 8 * q)))));
}
// four rows interleaved: dword i of the group's 64 bytes holds row r's weight i in bits 8r..8r+3
// and weight 16 + i in bits 8r+4..8r+7
static inline __m256 chunk(const Q4x4* w, int64_t row, int64_t b, int q, int64_t K) {
  const Q4x4* g = w + (row >> 2) * (K / 32) + b;
  const int r = int(row & 3);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g->qs + 32 * (q & 1)));
  const __m256i n = _mm256_and_si256(_mm256_srli_epi32(v, 8 * r + 4 * (q >> 1)), _mm256_set1_epi32(15));
  return _mm256_fmadd_ps(_mm256_set1_ps(g->d[r]), _mm256_cvtepi32_ps(n), _mm256_set1_ps(g->m[r]));
}

// R weight rows x MB tokens, all of K
template <int R, int MB, typename W>
static inline void tile(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ out,
                        const float* __restrict__ res, int64_t K, int64_t N, int64_t n, int64_t m) {
  __m256 acc[R][MB][2];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  const float* xm = x + m * K;
  // blocks: K % 32 == 0 (checked by the caller); fp32 / fp16: 16 weights at a time, then a tail
  const int64_t steps = is_block_v<W> ? K / 32 : K / 16;
  const int chunks = is_block_v<W> ? 4 : 2;
  // Blocks 2-3 KB ahead asked for in advance: interleaved Q4_1 32 groups ahead, by the tile that
  // holds a group's first row (the group's other rows read what it brought in), Q8_0 64 blocks
  // ahead. Timed against no prefetch in one process, on the Zen 3 host: a forward's matmuls at
  // 1 / 2 tokens 1.12x / 1.05x faster, 3-6 within noise (4 to 64 groups ahead gave 1.02-1.13x at
  // one token, 32 the most); the Q8_0 LM head at 1 / 4 tokens 1.19-1.21x / 1.04x (64 to 192
  // blocks ahead alike).
  constexpr int64_t ahead = std::is_same_v<W, Q4x4> ? 32 : 64;
  const bool prefetch = (std::is_same_v<W, Q4x4> && (n & 3) == 0) || std::is_same_v<W, Q8Block>;
  for (int64_t b = 0; b < steps; ++b) {
    if (prefetch) prefetch_block(w, n, b + ahead, K / 32);
    const int64_t bb = is_block_v<W> ? b : b / 2;  // chunk() counts 32 weights a step
    const int q0 = is_block_v<W> ? 0 : 2 * int(b & 1);
    // unrolled in full, so that the accumulators stay in registers
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < chunks; ++q) {
        const __m256 wv = chunk(w, n + r, bb, q0 + q, K);
        const float* xq = xm + 32 * bb + 8 * (q0 + q);
#pragma GCC unroll 6
        for (int j = 0; j < MB; ++j)
          acc[r][j][q & 1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xq + j * K), acc[r][j][q & 1]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) store_sum(reduce_halves(acc[r][j][0], acc[r][j][1]), x, w, out, res, K, N, n + r, m + j);
}

// R rows, every token: one tile for R = 4 (one token) and 2 (two), tiles of up to 6 tokens for one row
template <int R, typename W>
static void rows(const float* x, const W* w, float* out, const float* res, int64_t M, int64_t K, int64_t N,
                 int64_t n) {
  int64_t m = 0;
  if constexpr (R == 4) {
    for (; m < M; ++m) avx2::tile<4, 1>(x, w, out, res, K, N, n, m);
    return;
  } else if constexpr (R == 2) {
    for (; M - m >= 2; m += 2) avx2::tile<2, 2>(x, w, out, res, K, N, n, m);
    if (m < M) avx2::tile<2, 1>(x, w, out, res, K, N, n, m);
    return;
  }
  for (; M - m > 8; m += 6) avx2::tile<1, 6>(x, w, out, res, K, N, n, m);
  for (; M - m > 6; m += 4) avx2::tile<1, 4>(x, w, out, res, K, N, n, m);  // 7 and 8 as 4 + 3 and 4 + 4
  switch (M - m) {
    case 6: avx2::tile<1, 6>(x, w, out, res, K, N, n, m); break;
    case 5: avx2::tile<1, 5>(x, w, out, res, K, N, n, m); break;
    case 4: avx2::tile<1, 4>(x, w, out, res, K, N, n, m); break;
    case 3: avx2::tile<1, 3>(x, w, out, res, K, N, n, m); break;
    case 2: avx2::tile<1, 2>(x, w, out, res, K, N, n, m); break;
    case 1: avx2::tile<1, 1>(x, w, out, res, K, N, n, m); break;
    default: break;
  }
}

template <int R, typename W>
static void run_rows(const float* xp, const W* wp, float* op, const float* rp, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = N / R;
  at::parallel_for(0, tiles, 32 / R, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) avx2::rows<R>(xp, wp, op, rp, M, K, N, t * R);
  });
  for (int64_t n = tiles * R; n < N; ++n) avx2::rows<1, W>(xp, wp, op, rp, M, K, N, n);
}

template <typename W>
static void skinny(const float* xp, const W* wp, float* op, const float* rp, int64_t M, int64_t K, int64_t N) {
  // One row at a time streams the matrix in order, which the hardware prefetcher follows (a
  // tile of 4 rows ran the Q8_0 LM head at half the speed: 3.5 against 1.7 ms on the Zen 3 host).
  // Interleaved Q4_1 rows share their group's loads, so one or two tokens take 4 or 2 rows at a
  // time (layers at one token 7.0-7.6 against 7.9-8.9 ms).
  if (std::is_same_v<W, Q4x4> && M == 1)
    avx2::run_rows<4>(xp, wp, op, rp, M, K, N);
  else if (std::is_same_v<W, Q4x4> && M == 2)
    avx2::run_rows<2>(xp, wp, op, rp, M, K, N);
  else
    avx2::run_rows<1>(xp, wp, op, rp, M, K, N);
}
}  // namespace avx2
#endif

// R weight rows x MB tokens, all of K.
template <int R, int MB, typename W>
static inline void tile(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ out,
                        const float* __restrict__ res, int64_t K, int64_t N, int64_t n, int64_t m) {
  v16 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = v16{};
  const int64_t K16 = K & ~int64_t(15);
  if constexpr (is_block_v<W>) {
    // the same fused multiply-adds in the same order as fp32 weights: k, then k + 16
    const int64_t KB = K / 32;  // K % 32 == 0 (checked by the caller)
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<W, Q4x4> && R % 4 == 0) {
      // whole groups of four interleaved rows (n is a multiple of R): one 64-byte load a group and
      // block, its four rows dequantized from it in order; the same multiply-adds in the same order
      const Q4x4* wg = w + (n >> 2) * KB;  // group g of the tile, block b: wg + g * KB + b
      const float* xm = x + m * K;
      auto fmas = [&](int r, const v16& lo, const v16& hi, const float* xb) {
        for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + lo * load16(xb + j * K);
        for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + hi * load16(xb + j * K + 16);
      };
      if constexpr (MB >= 3) {
        // software-pipelined as the generic tile below: each row's weights are dequantized before
        // the previous row's multiply-adds are issued
        __m512i v = _mm512_loadu_si512(wg->qs);
        v16 l0, h0;
        dequant_row(wg, v, 0, l0, h0);
        for (int64_t b = 0; b < KB; ++b) {
          const float* xb = xm + 32 * b;
          for (int g = 0; g < R / 4; ++g) {
            const Q4x4* blk = wg + g * KB + b;
            const Q4x4* nxt = g + 1 < R / 4 ? blk + KB : b + 1 < KB ? wg + b + 1 : blk;
            prefetch_block(w, n + R + 4 * g, b, KB);
            v16 l1, h1, l2, h2, l3, h3;
            dequant_row(blk, v, 1, l1, h1);
            fmas(4 * g, l0, h0, xb);
            dequant_row(blk, v, 2, l2, h2);
            fmas(4 * g + 1, l1, h1, xb);
            dequant_row(blk, v, 3, l3, h3);
            fmas(4 * g + 2, l2, h2, xb);
            v = _mm512_loadu_si512(nxt->qs);
            dequant_row(nxt, v, 0, l0, h0);
            fmas(4 * g + 3, l3, h3, xb);
          }
        }
      } else {
        for (int64_t b = 0; b < KB; ++b) {
          v16 x0[MB], x1[MB];
          for (int j = 0; j < MB; ++j) {
            x0[j] = load16(xm + j * K + 32 * b);
            x1[j] = load16(xm + j * K + 32 * b + 16);
          }
          for (int g = 0; g < R / 4; ++g) {
            const Q4x4* blk = wg + g * KB + b;
            prefetch_block(w, n + R + 4 * g, b, KB);
            const __m512i v = _mm512_loadu_si512(blk->qs);
            v16 lo[4], hi[4];
            dequant_row(blk, v, 0, lo[0], hi[0]);
            dequant_row(blk, v, 1, lo[1], hi[1]);
            dequant_row(blk, v, 2, lo[2], hi[2]);
            dequant_row(blk, v, 3, lo[3], hi[3]);
            for (int rr = 0; rr < 4; ++rr) {
              for (int j = 0; j < MB; ++j) acc[4 * g + rr][j] = acc[4 * g + rr][j] + lo[rr] * x0[j];
              for (int j = 0; j < MB; ++j) acc[4 * g + rr][j] = acc[4 * g + rr][j] + hi[rr] * x1[j];
            }
          }
        }
      }
    } else
#endif
    if constexpr (MB >= 3 || std::is_same_v<W, Q8Block>) {
      // Software-pipelined: the next (block, row)'s weights are dequantized before this one's
      // multiply-adds are issued. In program order the other way round, 2 * MB multiply-adds wait
      // in the FP scheduler on each dequantization's load -> widen -> permute chain and fill it,
      // so the next chain cannot start early: 3-8-token passes ran at ~53% of the FMA peak, and
      // about 1.35x faster like this (the same operations in the same order: the same values).
      // Q8_0 blocks (the LM head) gain at every pass size: one token 1.3 -> 1.0-1.1 ms.
      const float* xm = x + m * K;
      v16 lo, hi;
      dequant(block_at(w, n, 0, KB), lo, hi);
      for (int64_t b = 0; b < KB; ++b) {
        const float* xb = xm + 32 * b;
        for (int r = 0; r < R; ++r) {
          v16 nlo, nhi;
          if (r + 1 < R)
            dequant(block_at(w, n + r + 1, b, KB), nlo, nhi);
          else if (b + 1 < KB)
            dequant(block_at(w, n, b + 1, KB), nlo, nhi);
          prefetch_block(w, n + R + r, b, KB);
          for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + lo * load16(xb + j * K);
          for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + hi * load16(xb + j * K + 16);
          lo = nlo;
          hi = nhi;
        }
      }
    } else {
      for (int64_t b = 0; b < KB; ++b) {
        v16 x0[MB], x1[MB];
        for (int j = 0; j < MB; ++j) {
          x0[j] = load16(x + (m + j) * K + 32 * b);
          x1[j] = load16(x + (m + j) * K + 32 * b + 16);
        }
        for (int r = 0; r < R; ++r) {
          prefetch_block(w, n + R + r, b, KB);
          v16 lo, hi;
          dequant(block_at(w, n + r, b, KB), lo, hi);
          for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + lo * x0[j];
          for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + hi * x1[j];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) store_sum(reduce16(acc[r][j]), x, w, out, res, K, N, n + r, m + j);
  } else {
    for (int64_t k = 0; k < K16; k += 16) {
      v16 xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = load16(x + (m + j) * K + k);
      for (int r = 0; r < R; ++r) {
        // the next tile's rows, a line per row per step: memory keeps streaming while this tile
        // computes (the hardware prefetcher alone leaves the FMAs waiting once M > 2)
        __builtin_prefetch(w + (n + R + r) * K + k, 0, 3);
        const v16 wv = load16(w + (n + r) * K + k);
        for (int j = 0; j < MB; ++j) acc[r][j] = acc[r][j] + wv * xv[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) store_sum(reduce16(acc[r][j]), x, w, out, res, K, N, n + r, m + j);
  }
}

template <int R, typename W>
static void rows(const float* x, const W* w, float* out, const float* res, int64_t M, int64_t K, int64_t N,
                 int64_t n) {
#ifdef VIA_SD_AVX2_TILES
  for (int r = 0; r < R; ++r) avx2::rows<1>(x, w, out, res, M, K, N, n + r);
  return;
#endif
  int64_t m = 0;
  if constexpr (std::is_same_v<W, Q4x4>) {
    // 4 rows x up to 6 tokens (24 accumulators; 4 x 8 would not fit in registers), so passes of
    // more than 8 in tiles of 6, each block dequantized once every 6 tokens: 12 and 16 tokens
    // 1.07x and 1.04x faster than in tiles of 4 (each run against the GGUF layout in its process,
    // four runs); 7 and 8 tokens read no different, and stay 4 + 3 and 4 + 4
    for (; M - m > 8; m += 6) tile<R, 6>(x, w, out, res, K, N, n, m);
    switch (M - m) {
      case 5: tile<R, 5>(x, w, out, res, K, N, n, m); return;
      case 6: tile<R, 6>(x, w, out, res, K, N, n, m); return;
      default: break;
    }
  } else if constexpr (is_block_v<W>) {
    // block weights: tiles of 8 tokens (a pass of up to 8 in one), each block dequantized once a tile
    for (; M - m > 8; m += 8) tile<R, 8>(x, w, out, res, K, N, n, m);
    switch (M - m) {
      case 5: tile<R, 5>(x, w, out, res, K, N, n, m); return;
      case 6: tile<R, 6>(x, w, out, res, K, N, n, m); return;
      case 7: tile<R, 7>(x, w, out, res, K, N, n, m); return;
      case 8: tile<R, 8>(x, w, out, res, K, N, n, m); return;
      default: break;
    }
  }
  for (; m + 4 <= M; m += 4) tile<R, 4>(x, w, out, res, K, N, n, m);
  switch (M - m) {
    case 3: tile<R, 3>(x, w, out, res, K, N, n, m); break;
    case 2: tile<R, 2>(x, w, out, res, K, N, n, m); break;
    case 1: tile<R, 1>(x, w, out, res, K, N, n, m); break;
    default: break;
  }
}

template <int R, typename W>
static void run_rows(const float* xp, const W* wp, float* op, const float* rp, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = N / R;
  at::parallel_for(0, tiles, 32 / R, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rows<R>(xp, wp, op, rp, M, K, N, t * R);
  });
  for (int64_t n = tiles * R; n < N; ++n) rows<1, W>(xp, wp, op, rp, M, K, N, n);
}

// out = x @ w^T (+ residual): the residual add of a decoder layer folded into the store.
template <typename W>
static void skinny(const float* xp, const W* wp, float* op, const float* rp, int64_t M, int64_t K, int64_t N) {
#ifdef VIA_SD_AVX2_TILES
  avx2::skinny(xp, wp, op, rp, M, K, N);
  return;
#endif
  // few tokens: more rows in flight (8 independent streams and accumulator chains); more tokens:
  // 4 rows x 4 tokens, 16 accumulators in registers
  if (M <= 2) {
    run_rows<8>(xp, wp, op, rp, M, K, N);
  } else if constexpr (is_block_v<W>) {
    // 4 rows x up to 4 tokens; wider passes 2 rows x tiles of up to 8 tokens (each block
    // dequantized once a tile); interleaved rows always in whole groups of 4 (rows() tiles tokens)
    if (M <= 4 || std::is_same_v<W, Q4x4>)
      run_rows<4>(xp, wp, op, rp, M, K, N);
    else
      run_rows<2>(xp, wp, op, rp, M, K, N);
  } else {
    run_rows<4>(xp, wp, op, rp, M, K, N);
  }
}

// w fp32, or fp16 (every fp16 value is exact in fp32, so the sums are those of w.float()), or
// uint8 [N, K / 32 * 20] Q4_1 (or [N / 4, K / 32 * 96], four rows interleaved) or int8
// [N, K / 32 * 34] Q8_0 blocks (the sums are those of the dequantized fp32 matrix)
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "skinny_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "skinny_linear: x fp32");
  // uint8 [N / 4, K / 32 * 96]: Q4_1 blocks four rows interleaved (Q4x4)
  const bool q4x4 = w.scalar_type() == at::kByte && x.size(1) % 32 == 0 &&
                    w.size(1) == x.size(1) / 32 * int64_t(sizeof(Q4x4));
  if (q4x4) {
  } else if (w.scalar_type() == at::kByte) {
    TORCH_CHECK(x.size(1) % 32 == 0 && w.size(1) == x.size(1) / 32 * int64_t(sizeof(Q4Block)),
                "skinny_linear: Q4_1 w [N, K / 32 * 20] or [N / 4, K / 32 * 96] bytes, K a multiple of 32");
  } else if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(x.size(1) % 32 == 0 && w.size(1) == x.size(1) / 32 * int64_t(sizeof(Q8Block)),
                "skinny_linear: Q8_0 w [N, K / 32 * 34] int8, K a multiple of 32");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf,
                "skinny_linear: w fp32, fp16, Q4_1 (uint8) or Q8_0 (int8) blocks");
    TORCH_CHECK(x.size(1) == w.size(1), "skinny_linear: K mismatch");
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = q4x4 ? 4 * wc.size(0) : wc.size(0);
  auto out = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  torch::Tensor rc;
  const float* rp = nullptr;
  if (residual.has_value()) {
    rc = residual->contiguous();
    TORCH_CHECK(rc.scalar_type() == at::kFloat && rc.size(0) == M && rc.size(1) == N, "skinny_linear: residual [M, N]");
    rp = rc.data_ptr<float>();
  }
  if (q4x4) {
    skinny(xp, reinterpret_cast<const Q4x4*>(wc.data_ptr<uint8_t>()), op, rp, M, K, N);
  } else if (wc.scalar_type() == at::kByte) {
    skinny(xp, reinterpret_cast<const Q4Block*>(wc.data_ptr<uint8_t>()), op, rp, M, K, N);
  } else if (wc.scalar_type() == at::kChar) {
    skinny(xp, reinterpret_cast<const Q8Block*>(wc.data_ptr<int8_t>()), op, rp, M, K, N);
  } else if (wc.scalar_type() == at::kHalf) {
    skinny(xp, reinterpret_cast<const _Float16*>(wc.data_ptr<at::Half>()), op, rp, M, K, N);
  } else {
    skinny(xp, wc.data_ptr<float>(), op, rp, M, K, N);
  }
  return out;
}

// Greedy logits: x [M, K] @ w^T read from the fp16 copy w16 [N, K], then, for every row j that
// could hold some token's argmax (model.GreedyHead gives the bound: |a - exact| <= ||x_m|| err[j]),
// the exact fp32 value from w [N, K], computed by the same tile as in the fp32 pass, so bitwise
// that pass's value. Every other entry keeps its fp16 value, which is below the row's maximum.
// Returns (logits [M, N], ids of the rows recomputed). More than `max_exact` candidates (a flat
// or non-finite row) recompute the whole matrix in fp32 and return no ids.
std::tuple<torch::Tensor, torch::Tensor> greedy_linear(const torch::Tensor& x, const torch::Tensor& w16,
                                                       const torch::Tensor& w, const torch::Tensor& err,
                                                       int64_t max_exact) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "greedy_linear: x fp32 [M, K]");
  TORCH_CHECK(w16.scalar_type() == at::kHalf && w.scalar_type() == at::kFloat && w16.sizes() == w.sizes() &&
              w16.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1),
              "greedy_linear: w16 fp16 and w fp32, both [N, K]");
  TORCH_CHECK(err.scalar_type() == at::kFloat && err.is_contiguous() && err.numel() == w.size(0), "greedy_linear: err fp32 [N]");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* ep = err.data_ptr<float>();
  auto out = torch::empty({M, N}, xc.options());
  float* op = out.data_ptr<float>();
  skinny(xp, reinterpret_cast<const _Float16*>(w16.data_ptr<at::Half>()), op, nullptr, M, K, N);
  std::vector<uint8_t> mark(N, 0);
  bool finite = true;
  const int64_t N16 = N & ~int64_t(15);
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += double(xp[m * K + k]) * double(xp[m * K + k]);
    // ||x_m||, rounded up to a float
    const float b = std::nextafter(float(std::sqrt(ss)), INFINITY);
    const float* r = op + m * N;
    const v16 bv = v16{} + b;
    v16 lowv = v16{} - INFINITY;
    for (int64_t j = 0; j < N16; j += 16) {
      const v16 v = load16(r + j) - bv * load16(ep + j);
      lowv = v > lowv ? v : lowv;
    }
    float low = -INFINITY;
    for (int i = 0; i < 16; ++i) low = std::max(low, lowv[i]);
    for (int64_t j = N16; j < N; ++j) low = std::max(low, r[j] - b * ep[j]);
    if (!std::isfinite(low) || !std::isfinite(b)) finite = false;
    for (int64_t j = 0; j < N; ++j) mark[j] |= uint8_t(r[j] + b * ep[j] >= low);
  }
  std::vector<int64_t> ids;
  for (int64_t j = 0; j < N && finite; ++j)
    if (mark[j]) ids.push_back(j);
  if (!finite || ids.empty() || int64_t(ids.size()) > max_exact) {
    skinny(xp, wp, op, nullptr, M, K, N);
    return {out, torch::empty({0}, torch::dtype(torch::kLong))};
  }
  for (int64_t j : ids) rows<1, float>(xp, wp, op, nullptr, M, K, N, j);
  auto idt = torch::empty({int64_t(ids.size())}, torch::dtype(torch::kLong));
  std::memcpy(idt.data_ptr<int64_t>(), ids.data(), ids.size() * sizeof(int64_t));
  return {out, idt};
}

// One row's RMSNorm, scaled by w (nullptr: by one)
static inline void rms_row(const float* x, const float* w, float* o, int64_t H, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / float(H) + eps);
  for (int64_t i = 0; i < H; ++i) o[i] = w ? x[i] * inv * w[i] : x[i] * inv;
}

// RMSNorm of a few rows, in one pass over each row and on the calling thread: for decode-sized
// inputs a parallel region costs more than the arithmetic.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32 [M, H]");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), H = xc.size(1);
  auto out = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) rms_row(xp + m * H, wp, op + m * H, H, float(eps));
  return out;
}

// Each row's argmax, as torch.argmax gives it (the first index of the maximum; a row holding NaN:
// its first NaN), on the calling thread: a greedy step reads one row of 49,152 logits, where
// torch's argmax took 45-85 us and its parallel region most of that.
static int64_t argmax_row(const float* x, int64_t n) {
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (x[i] != x[i]) return i;
  }
  constexpr int64_t C = 64;
  for (int64_t at = 0; at < n; at += C) {
    const int64_t end = std::min(n, at + C);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = at; i < end; ++i) hit |= x[i] == m;
    if (hit)
      for (int64_t i = at; i < end; ++i)
        if (x[i] == m) return i;
  }
  return 0;  // n == 0 is refused below
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: fp32 [M, N], N > 0");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), N = xc.size(1);
  auto out = torch::empty({M}, torch::dtype(torch::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) op[m] = argmax_row(xp + m * N, N);
  return out;
}

// q . k in 16-wide lanes, then a fixed-order reduction and the scalar tail
static inline float dot(const float* a, const float* b, int64_t n) {
  const int64_t n16 = n & ~int64_t(15);
  v16 acc{};
  for (int64_t i = 0; i < n16; i += 16) acc = acc + load16(a + i) * load16(b + i);
  float s = reduce16(acc);
  for (int64_t i = n16; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x in each lane (Cephes' polynomial, about 1 ulp); 0 below -87. The attention's softmax uses
// it for every pass size, so a token's weights do not depend on what shares its pass. V: a float
// vector type, VI: the int32 one of the same lanes.
template <typename V, typename VI>
static inline V exp_lanes(V x) {
  const VI small = x < -87.f;  // lanes that underflow: zero
  x = small ? V{} - 87.f : x;
  const V magic = V{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &e, sizeof(scale));
  const V out = y * scale;
  return small ? V{} : out;
}
static inline v16 exp16(v16 x) { return exp_lanes<v16, vi16>(x); }

#ifdef VIA_SD_AVX2_TILES
// The same on 8 lanes, for paged_attention's softmax on AVX2: each lane's result is the same,
// and the attention ran 1.1-1.3x faster than with the 16-lane form there (decoding and prefill
// alike, Zen 3). silu_mul's 16-lane loop stays: on 8 lanes it was 0.8-0.94x.
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32)));
static inline v8f exp8(v8f x) { return exp_lanes<v8f, vi8>(x); }
#endif

// Sixteen dot products at once: acc[k] holds key k's 16 partial sums; a tree of lane shuffles
// adds them so that lane k of the result is key k's score (inputs go in bit-reversed order).
// Each score's additions are the same whatever the other fifteen keys are.
static inline v16 add_pairs8(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline v16 add_pairs4(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
static inline v16 add_pairs2(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
static inline v16 add_pairs1(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
static inline v16 reduce16x16(const v16* a) {
  static constexpr int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  v16 r[8], s[4], t[2];
  for (int i = 0; i < 8; ++i) r[i] = add_pairs8(a[rev[2 * i]], a[rev[2 * i + 1]]);
  for (int i = 0; i < 4; ++i) s[i] = add_pairs4(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 2; ++i) t[i] = add_pairs2(s[2 * i], s[2 * i + 1]);
  return add_pairs1(t[0], t[1]);
}

constexpr int64_t QC = 4;  // queries per attention work item
constexpr int64_t VC = 4;  // 16-float column blocks of V per accumulator pass (hd <= 64 in one)
// paged_attention's phased path: passes of at most this many tokens whose longest context is at
// least PHASED_MIN_CONTEXT, scores in units of PHASED_KEYS keys
constexpr int64_t PHASED_MAX_TOKENS = 64;
constexpr int64_t PHASED_MIN_CONTEXT = 1024;
constexpr int64_t PHASED_KEYS = 256;

// silu(g) * u for gu = [g | u] along the last axis: [M, 2I] -> [M, I].
torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.size(1) % 2 == 0, "silu_mul: fp32 [M, 2I]");
  auto c = gu.contiguous();
  const int64_t M = c.size(0), I = c.size(1) / 2;
  auto out = torch::empty({M, I}, c.options());
  const float* p = c.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // rows in parallel (a prefill chunk's thousands); each row's values do not depend on the split
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = p + m * 2 * I;
      const float* u = g + I;
      float* om = o + m * I;
      // 16 lanes with exp16 (e^-g capped at e^88, where g / (1 + e^-g) is zero to 36 digits)
      const int64_t I16 = I & ~int64_t(15);
      for (int64_t i = 0; i < I16; i += 16) {
        const v16 gv = load16(g + i);
        v16 x = v16{} - gv;
        x = x > 88.f ? v16{} + 88.f : x;
        const v16 r = gv / (1.f + exp16(x)) * load16(u + i);
        __builtin_memcpy(om + i, &r, sizeof(r));
      }
      for (int64_t i = I16; i < I; ++i) om[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// Rotary on one head's hd values: the layout of paged_attention and of the torch forward
template <typename O>
static inline void rotate_head(const float* x, const float* c, const float* s, O* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    out[i] = O(x[i] * c[i] - x[i + half] * s[i]);
    out[i + half] = O(x[i + half] * c[i + half] + x[i] * s[i + half]);
  }
}

// The K/V cache holds fp32 (the model's own values) or fp16 (`--kv-cache-dtype fp16`: half the
// bytes that attention reads, rounded once when stored; read back exactly by load16).
template <typename C>
static C* cache_ptr(torch::Tensor& t) {
  if constexpr (std::is_same_v<C, float>) return t.data_ptr<float>();
  else return reinterpret_cast<_Float16*>(t.data_ptr<at::Half>());
}

static bool half_cache(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const char* who) {
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(dt == v_cache.scalar_type() && (dt == at::kFloat || dt == at::kHalf), who,
              ": K/V caches fp32 or fp16, both the same");
  return dt == at::kHalf;
}

// Rotary on the queries and keys of qkv [N, (nh + 2 nkv) hd], the rotated keys and the values
// into the cache at slot_mapping; returns the rotated queries [N, nh hd]. paged_attention's first
// half, and on its own for passes whose attention runs elsewhere (runs wider than PAGED_MAX_QUERIES).
template <typename C>
torch::Tensor rotate_store_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                const torch::Tensor& positions, const torch::Tensor& slot_mapping, torch::Tensor k_cache,
                                torch::Tensor v_cache, int64_t nh, int64_t nkv) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat, "rotate_store: fp32 projections");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "rotate_store: contiguous caches");
  auto q3 = qkv.contiguous();
  auto cs = cos.contiguous();
  auto sn = sin.contiguous();
  auto pos = positions.contiguous();
  auto slots = slot_mapping.contiguous();
  const int64_t N = q3.size(0);
  const int64_t hd = k_cache.size(2);
  const int64_t half = hd / 2;
  const int64_t width = (nh + 2 * nkv) * hd;
  TORCH_CHECK(q3.size(1) == width, "rotate_store: qkv width");
  const float* qp = q3.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  C* kc = cache_ptr<C>(k_cache);
  C* vc = cache_ptr<C>(v_cache);
  const int64_t row = nkv * hd;
  auto out = torch::empty({N, nh * hd}, q3.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* src = qp + t * width;
      const float* c = cp + posp[t] * hd;
      const float* s = sp + posp[t] * hd;
      for (int64_t h = 0; h < nh; ++h) rotate_head(src + h * hd, c, s, op + (t * nh + h) * hd, half);
      C* kd = kc + slp[t] * row;
      C* vd = vc + slp[t] * row;
      for (int64_t h = 0; h < nkv; ++h) {
        rotate_head(src + (nh + h) * hd, c, s, kd + h * hd, half);
        const float* v = src + (nh + nkv + h) * hd;
        if constexpr (std::is_same_v<C, float>) {
          std::memcpy(vd + h * hd, v, hd * sizeof(float));
        } else {
          for (int64_t i = 0; i < hd; ++i) vd[h * hd + i] = C(v[i]);
        }
      }
    }
  });
  return out;
}

torch::Tensor rotate_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           const torch::Tensor& positions, const torch::Tensor& slot_mapping, torch::Tensor k_cache,
                           torch::Tensor v_cache, int64_t nh, int64_t nkv) {
  if (half_cache(k_cache, v_cache, "rotate_store"))
    return rotate_store_impl<_Float16>(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, nh, nkv);
  return rotate_store_impl<float>(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, nh, nkv);
}

// Rotary embedding, K/V store into the paged cache, and causal attention over each token's
// sequence context read in place through its slots (no gather, no padding).
//   qkv        [N, (nh + 2 nkv) hd]   this layer's projections of the N new tokens
//   cos, sin   [P, hd]                the rotary tables; row = position
//   positions  [N]   token_seq [N] (row of ctx_slots)   slot_mapping [N] (where K/V go)
//   ctx_slots  [B, L] cache slot of each context position of each sequence
// Token t attends to positions 0..positions[t] of its sequence. Grouped-query: head h reads K/V
// head h / (nh / nkv). Returns [N, nh hd].
template <typename C>
torch::Tensor paged_attention_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                   const torch::Tensor& positions, const torch::Tensor& token_seq,
                                   const torch::Tensor& slot_mapping, const torch::Tensor& ctx_slots,
                                   torch::Tensor k_cache, torch::Tensor v_cache, int64_t nh, int64_t nkv, double scale) {
  // rotated queries, and K/V of the new tokens into the cache (before any token reads them)
  const torch::Tensor q = rotate_store_impl<C>(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, nh, nkv);
  auto pos = positions.contiguous();
  auto seq = token_seq.contiguous();
  auto ctx = ctx_slots.contiguous();
  const int64_t N = q.size(0);
  const int64_t hd = k_cache.size(2);
  const int64_t L = ctx.size(1);
  const int64_t G = nh / nkv;
  const float* qd = q.data_ptr<float>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  const int64_t* seqp = seq.data_ptr<int64_t>();
  const int64_t* ctxp = ctx.data_ptr<int64_t>();
  const C* kc = cache_ptr<C>(k_cache);
  const C* vc = cache_ptr<C>(v_cache);
  const int64_t row = nkv * hd;  // values per cache slot

  auto out = torch::empty({N, nh * hd}, q.options());
  float* op = out.data_ptr<float>();
  const float sc = float(scale);
  // Work items: (run of consecutive tokens of one sequence, KV head, up to QC of the run's queries
  // on that head). An item reads each K and V row once for all its queries instead of once per
  // query: grouped-query heads and the draft tokens of a verification share their context.
  struct Run { int64_t t0, nq, nmax; };  // nq: queries per KV head, ordered (token, head)
  std::vector<Run> runs;
  int64_t max_ctx = 0;
  for (int64_t t0 = 0; t0 < N;) {
    int64_t t1 = t0 + 1, nmax = posp[t0] + 1;
    while (t1 < N && seqp[t1] == seqp[t0]) nmax = std::max(nmax, posp[t1++] + 1);
    runs.push_back({t0, (t1 - t0) * G, nmax});
    max_ctx = std::max(max_ctx, nmax);
    t0 = t1;
  }
  struct Item { int64_t t0, nq, g, q0; };
  std::vector<Item> items;
  // QC queries per item: with one token, an item is one KV head's group of query heads (each K/V
  // row read once for the group, measured faster than one query per item despite fewer items)
  const int64_t qc = QC;
  for (const Run& r : runs)
    for (int64_t g = 0; g < nkv; ++g)
      for (int64_t q0 = 0; q0 < r.nq; q0 += qc) items.push_back({r.t0, r.nq, g, q0});
  const int64_t L16 = (L + 15) & ~int64_t(15);
  const int64_t hd16 = hd & ~int64_t(15);
  // how many rows ahead p @ V asks for V: a decode or verification pass reads its context cold
  // (the layers' weights went through the caches since), a prompt's chunk reads rows its other
  // items just read. Paired in the engine, 32 against 8: one-token passes 1.02x at 300-600
  // positions, 1.04-1.08x at 1,100, 1.08-1.11x at 3,500, verification passes 1.00-1.16x; a
  // 512-token chunk 0.90-0.98x, so it keeps 8. Measured on AVX2 (Zen 3) only: the other builds
  // keep 8.
#ifdef VIA_SD_AVX2_TILES
  const int64_t v_ahead = N <= PHASED_MAX_TOKENS ? 32 : 8;
#else
  const int64_t v_ahead = 8;
#endif

  // The pieces of a query's attention. The item loop below and the phased path after it run the
  // same pieces, so a query's sums are the same whichever path and whatever shares its pass.
  //
  // Key rows j0..j0+15 of KV head g (past nmax: row 0, whose scores no query keeps), with the next
  // block's rows on their way while this one computes (rows are scattered over the cache's blocks,
  // and a cold layer's context comes from memory).
  auto key_rows = [&](const int64_t* cs_row, int64_t g, int64_t j0, int64_t nmax, const C** kr) {
    for (int64_t k = 0; k < 16; ++k) kr[k] = kc + cs_row[j0 + k < nmax ? j0 + k : 0] * row + g * hd;
    for (int64_t k = 0; k < 16 && j0 + 16 + k < nmax; ++k) {
      const char* nk = reinterpret_cast<const char*>(kc + cs_row[j0 + 16 + k] * row + g * hd);
      for (int64_t b = 0; b < hd * int64_t(sizeof(C)); b += 64) __builtin_prefetch(nk + b, 0, 3);
    }
  };
  // One query's scores against 16 key rows, scaled, into dst[0..15].
  auto scores16 = [&](const float* qv, const C* const* kr, float* dst) {
#ifdef VIA_SD_AVX2_TILES
    // 16 v16 accumulators would spill on AVX2: four keys at a time, each as its two halves,
    // then reduce16's tree per key, which is the tree reduce16x16 adds each key's lanes by
    float s16[16];
    for (int64_t k0 = 0; k0 < 16; k0 += 4) {
      __m256 lo[4], hi[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) lo[k] = hi[k] = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd16; d += 16) {
        const __m256 ql = _mm256_loadu_ps(qv + d), qh = _mm256_loadu_ps(qv + d + 8);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          lo[k] = _mm256_fmadd_ps(ql, avx2::load8(kr[k0 + k] + d), lo[k]);
          hi[k] = _mm256_fmadd_ps(qh, avx2::load8(kr[k0 + k] + d + 8), hi[k]);
        }
      }
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) s16[k0 + k] = reduce_halves(lo[k], hi[k]);
    }
    v16 sc16 = load16(s16);
#else
    v16 acc[16];
    for (int64_t k = 0; k < 16; ++k) acc[k] = v16{};
    for (int64_t d = 0; d < hd16; d += 16) {
      const v16 q16 = load16(qv + d);
      for (int64_t k = 0; k < 16; ++k) acc[k] = acc[k] + q16 * load16(kr[k] + d);
    }
    v16 sc16 = reduce16x16(acc);
#endif
    if (hd16 < hd) {
      float tail[16];
      for (int64_t k = 0; k < 16; ++k) {
        float t = 0.f;
        // fused explicitly: the same operations whichever type the cache holds
        for (int64_t d = hd16; d < hd; ++d) t = std::fma(qv[d], float(kr[k][d]), t);
        tail[k] = t;
      }
      sc16 = sc16 + load16(tail);
    }
    sc16 = sc16 * sc;
    __builtin_memcpy(dst, &sc16, sizeof(sc16));
  };
  // Softmax of one query's scores p[0..n) in place, 16 lanes at a time; zero from n to nmax (the
  // keys its p @ V reads past its context). Returns 1 / the sum.
  auto softmax_row = [&](float* p, int64_t n, int64_t nmax) -> float {
    const int64_t n16 = (n + 15) & ~int64_t(15);
    for (int64_t j = n; j < n16; ++j) p[j] = -INFINITY;
    // the maximum in 16 lanes (a scalar max is a chain of dependent instructions); exact, so
    // the same value whatever the order
#ifdef VIA_SD_AVX2_TILES
    // the same sums on 8-lane halves: den's lanes 0-7 and 8-15 as two accumulators
    __m256 mlo = _mm256_set1_ps(-INFINITY), mhi = mlo;
    for (int64_t j = 0; j < n16; j += 16) {
      mlo = _mm256_max_ps(_mm256_loadu_ps(p + j), mlo);
      mhi = _mm256_max_ps(_mm256_loadu_ps(p + j + 8), mhi);
    }
    float mv8[16];
    _mm256_storeu_ps(mv8, mlo);
    _mm256_storeu_ps(mv8 + 8, mhi);
    float mx = -INFINITY;
    for (int i = 0; i < 16; ++i) mx = mv8[i] > mx ? mv8[i] : mx;
    v8f dlo{}, dhi{};
    for (int64_t j = 0; j < n16; j += 16) {
      v8f xl, xh;
      __builtin_memcpy(&xl, p + j, sizeof(xl));
      __builtin_memcpy(&xh, p + j + 8, sizeof(xh));
      const v8f el = exp8(xl - mx), eh = exp8(xh - mx);
      __builtin_memcpy(p + j, &el, sizeof(el));
      __builtin_memcpy(p + j + 8, &eh, sizeof(eh));
      dlo = dlo + el;
      dhi = dhi + eh;
    }
    v16 den;
    __builtin_memcpy(&den, &dlo, sizeof(dlo));
    __builtin_memcpy(reinterpret_cast<char*>(&den) + sizeof(dlo), &dhi, sizeof(dhi));
#else
    v16 mv = v16{} - INFINITY;
    for (int64_t j = 0; j < n16; j += 16) {
      const v16 x = load16(p + j);
      mv = x > mv ? x : mv;
    }
    float mx = -INFINITY;
    for (int i = 0; i < 16; ++i) mx = mv[i] > mx ? mv[i] : mx;
    v16 den{};
    for (int64_t j = 0; j < n16; j += 16) {
      const v16 e = exp16(load16(p + j) - mx);
      __builtin_memcpy(p + j, &e, sizeof(e));
      den = den + e;
    }
#endif
    for (int64_t j = n16; j < nmax; ++j) p[j] = 0.f;
    return 1.f / reduce16(den);
  };
  // p @ V for QC queries (weight rows pr[a], zeros for an absent query: a zero weight adds
  // nothing, so a query's sums are the ones it would get alone) over keys 0..nmax of KV head g,
  // NC blocks of 16 columns from c0; query a's columns, times inv[a], go to o[a] + c0 (none where
  // o[a] is null). The counts are compile-time so that the accumulators stay in registers.
  auto pv_block = [&](auto nc_tag, const float* const* pr, const int64_t* cs_row, int64_t g, int64_t nmax,
                      int64_t c0, float* const* o, const float* inv) {
    constexpr int64_t NC = decltype(nc_tag)::value;
#ifdef VIA_SD_AVX2_TILES
    // on AVX2, QC x VC v16 accumulators would spill: one block of 16 columns at a time, each
    // query's as two halves, the same multiply-adds in the same order
    for (int64_t c = 0; c < NC; ++c) {
      const int64_t cc = c0 + 16 * c;
      __m256 lo[QC], hi[QC];
#pragma GCC unroll 4
      for (int64_t a = 0; a < QC; ++a) lo[a] = hi[a] = _mm256_setzero_ps();
      for (int64_t j = 0; j < nmax; ++j) {
        const C* vv = vc + cs_row[j] * row + g * hd + cc;
        if (j + v_ahead < nmax) __builtin_prefetch(vc + cs_row[j + v_ahead] * row + g * hd + cc, 0, 3);
        const __m256 vl = avx2::load8(vv), vh = avx2::load8(vv + 8);
#pragma GCC unroll 4
        for (int64_t a = 0; a < QC; ++a) {
          const __m256 pj = _mm256_broadcast_ss(pr[a] + j);
          lo[a] = _mm256_fmadd_ps(pj, vl, lo[a]);
          hi[a] = _mm256_fmadd_ps(pj, vh, hi[a]);
        }
      }
      // over all QC, so that every index is a constant and the accumulators stay in registers
#pragma GCC unroll 4
      for (int64_t a = 0; a < QC; ++a) {
        if (!o[a]) continue;
        const __m256 iv = _mm256_set1_ps(inv[a]);
        _mm256_storeu_ps(o[a] + cc, _mm256_mul_ps(lo[a], iv));
        _mm256_storeu_ps(o[a] + cc + 8, _mm256_mul_ps(hi[a], iv));
      }
    }
#else
    v16 acc[QC][NC];
    for (int64_t a = 0; a < QC; ++a)
      for (int64_t c = 0; c < NC; ++c) acc[a][c] = v16{};
    for (int64_t j = 0; j < nmax; ++j) {
      const C* vv = vc + cs_row[j] * row + g * hd + c0;
      if (j + v_ahead < nmax) {
        const char* nv = reinterpret_cast<const char*>(vc + cs_row[j + v_ahead] * row + g * hd + c0);
        for (int64_t b = 0; b < NC * 16 * int64_t(sizeof(C)); b += 64) __builtin_prefetch(nv + b, 0, 3);
      }
      v16 vr[NC];
      for (int64_t c = 0; c < NC; ++c) vr[c] = load16(vv + 16 * c);
      for (int64_t a = 0; a < QC; ++a) {
        const float pj = pr[a][j];
        for (int64_t c = 0; c < NC; ++c) acc[a][c] = acc[a][c] + pj * vr[c];
      }
    }
    for (int64_t a = 0; a < QC; ++a) {
      if (!o[a]) continue;
      for (int64_t c = 0; c < NC; ++c) {
        const v16 r = acc[a][c] * inv[a];
        __builtin_memcpy(o[a] + c0 + 16 * c, &r, sizeof(r));
      }
    }
#endif
  };
  // a head size that is not a multiple of 16: the tail columns one by one
  auto pv_tail = [&](const float* p, const int64_t* cs_row, int64_t g, int64_t n, float inv, float* o) {
    for (int64_t i = hd16; i < hd; ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < n; ++j) s = std::fma(p[j], float(vc[cs_row[j] * row + g * hd + i]), s);
      o[i] = s * inv;
    }
  };
  // all of a head size's column blocks for one group of QC queries
  auto pv_all = [&](const float* const* pr, const int64_t* cs_row, int64_t g, int64_t nmax, float* const* o,
                    const float* inv) {
    int64_t c0 = 0;
#ifndef VIA_SD_AVX2_TILES
    for (; c0 + 16 * VC <= hd; c0 += 16 * VC) pv_block(std::integral_constant<int64_t, VC>{}, pr, cs_row, g, nmax, c0, o, inv);
#endif
    for (; c0 + 16 <= hd; c0 += 16) pv_block(std::integral_constant<int64_t, 1>{}, pr, cs_row, g, nmax, c0, o, inv);
  };

  // query qi of a run starting at token t0, on KV head g: its token and query head
  auto query = [&](int64_t t0, int64_t g, int64_t qi, int64_t& tok, int64_t& head) {
    tok = t0 + qi / G;
    head = g * G + qi % G;
  };

  auto work = [&](int64_t b0, int64_t b1, int64_t step) {
    std::vector<float> pbuf(QC * L16);
    for (int64_t it = b0; it < b1; it += step) {
      const Item& item = items[it];
      const int64_t nq = std::min<int64_t>(qc, item.nq - item.q0);
      const int64_t* cs_row = ctxp + seqp[item.t0] * L;
      const float* qv[QC];
      int64_t tok[QC], head[QC], nctx[QC];
      // the keys this item reads: up to its own queries' farthest position, not the run's (a
      // prefill chunk's early tokens skip the keys they cannot see; a skipped key would weigh
      // zero, so every query's sums are the same as with the run's bound)
      int64_t nmax = 0;
      for (int64_t a = 0; a < nq; ++a) {
        query(item.t0, item.g, item.q0 + a, tok[a], head[a]);
        nctx[a] = posp[tok[a]] + 1;
        nmax = nctx[a] > nmax ? nctx[a] : nmax;
        qv[a] = qd + (tok[a] * nh + head[a]) * hd;
      }
      // scores, 16 keys at a time: each K row once for all queries
      for (int64_t j0 = 0; j0 < nmax; j0 += 16) {
        const C* kr[16];
        key_rows(cs_row, item.g, j0, nmax, kr);
        for (int64_t a = 0; a < nq; ++a) scores16(qv[a], kr, pbuf.data() + a * L16 + j0);
      }
      float inv[QC] = {};
      for (int64_t a = 0; a < nq; ++a) inv[a] = softmax_row(pbuf.data() + a * L16, nctx[a], nmax);
      // p @ V: each V row once for all queries
      for (int64_t a = nq; a < QC; ++a) std::fill(pbuf.begin() + a * L16, pbuf.begin() + a * L16 + nmax, 0.f);
      const float* pr[QC];
      float* o[QC];
      for (int64_t a = 0; a < QC; ++a) {
        pr[a] = pbuf.data() + a * L16;
        o[a] = a < nq ? op + tok[a] * nh * hd + head[a] * hd : nullptr;
      }
      pv_all(pr, cs_row, item.g, nmax, o, inv);
      for (int64_t a = 0; a < nq; ++a) pv_tail(pr[a], cs_row, item.g, nctx[a], inv[a], o[a]);
    }
  };
  const int64_t n_items = int64_t(items.size());
  const int64_t T = std::min<int64_t>(at::get_num_threads(), n_items);
  if (T > 1 && N <= PHASED_MAX_TOKENS && max_ctx >= PHASED_MIN_CONTEXT && hd >= 16) {
    // Long contexts, few new tokens (decoding, verification): the items above would be few (one
    // per KV head for a decode token), so the threads' shares are uneven, and a verification
    // pass's items each read the whole context again. Instead, three phases, each split evenly
    // between the threads: the scores by blocks of keys (each K row read once for all of a KV
    // head's queries), the softmax by query, p @ V by group of QC queries and block of 16
    // columns. Each query runs the same pieces in the same order as in an item.
    // a run's queries on one KV head; their score rows start at row r0 of sbuf (QC rows a group)
    struct Group { int64_t t0, nq, g, nmax, r0; };
    std::vector<Group> groups;
    int64_t rows = 0;
    for (const Run& r : runs)
      for (int64_t g = 0; g < nkv; ++g) {
        groups.push_back({r.t0, r.nq, g, r.nmax, rows});
        rows += (r.nq + QC - 1) / QC * QC;
      }
    std::vector<float> sbuf(rows * L16);  // zeros: the rows of absent queries weigh nothing
    std::vector<float> invs(rows);
    struct Unit { int64_t grp, a, c; };  // a: key block or query group (times QC), c: column block
    std::vector<Unit> score_units, row_units, pv_units;
    for (int64_t i = 0; i < int64_t(groups.size()); ++i) {
      const Group& gr = groups[i];
      for (int64_t j0 = 0; j0 < gr.nmax; j0 += PHASED_KEYS) score_units.push_back({i, j0, 0});
      for (int64_t a = 0; a < gr.nq; ++a) row_units.push_back({i, a, 0});
      // query groups innermost: a thread's consecutive units read the same columns of V, which
      // stay in its L2 (1.03-1.05x for 6-token passes at 1,100-8,000 positions against columns
      // innermost, paired in one process)
      for (int64_t c0 = 0; c0 < hd16; c0 += 16)
        for (int64_t a0 = 0; a0 < gr.nq; a0 += QC) pv_units.push_back({i, a0, c0});
    }
    auto srow = [&](const Group& gr, int64_t a) { return sbuf.data() + (gr.r0 + a) * L16; };
    at::parallel_for(0, int64_t(score_units.size()), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const Group& gr = groups[score_units[u].grp];
        const int64_t* cs_row = ctxp + seqp[gr.t0] * L;
        const int64_t j1 = std::min(gr.nmax, score_units[u].a + PHASED_KEYS);
        for (int64_t j0 = score_units[u].a; j0 < j1; j0 += 16) {
          const C* kr[16];
          key_rows(cs_row, gr.g, j0, gr.nmax, kr);
          for (int64_t a = 0; a < gr.nq; ++a) {
            int64_t tok, head;
            query(gr.t0, gr.g, a, tok, head);
            scores16(qd + (tok * nh + head) * hd, kr, srow(gr, a) + j0);
          }
        }
      }
    });
    at::parallel_for(0, int64_t(row_units.size()), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const Group& gr = groups[row_units[u].grp];
        const int64_t a = row_units[u].a;
        int64_t tok, head;
        query(gr.t0, gr.g, a, tok, head);
        invs[gr.r0 + a] = softmax_row(srow(gr, a), posp[tok] + 1, gr.nmax);
      }
    });
    at::parallel_for(0, int64_t(pv_units.size()), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const Group& gr = groups[pv_units[u].grp];
        const int64_t a0 = pv_units[u].a, c0 = pv_units[u].c;
        const int64_t* cs_row = ctxp + seqp[gr.t0] * L;
        const float* pr[QC];
        float* o[QC];
        for (int64_t a = 0; a < QC; ++a) {
          pr[a] = srow(gr, a0 + a);
          o[a] = nullptr;
          if (a0 + a < gr.nq) {
            int64_t tok, head;
            query(gr.t0, gr.g, a0 + a, tok, head);
            o[a] = op + tok * nh * hd + head * hd;
          }
        }
        const float* inv = invs.data() + gr.r0 + a0;
        pv_block(std::integral_constant<int64_t, 1>{}, pr, cs_row, gr.g, gr.nmax, c0, o, inv);
        if (c0 + 16 >= hd16)  // the tail columns once, with the last block
          for (int64_t a = 0; a < QC && a0 + a < gr.nq; ++a) {
            int64_t tok, head;
            query(gr.t0, gr.g, a0 + a, tok, head);
            pv_tail(pr[a], cs_row, gr.g, posp[tok] + 1, inv[a], o[a]);
          }
      }
    });
  } else if (N * nh * L * hd >= (int64_t(1) << 17) && n_items > 1) {
    // a parallel region pays off only for long contexts or many tokens; items dealt out in turn,
    // not in halves: a prefill chunk's items grow with their position, and contiguous halves
    // would leave one thread the late (long) ones
    at::parallel_for(0, T, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) work(w, n_items, T);
    });
  } else {
    work(0, n_items, 1);
  }
  return out;
}

torch::Tensor paged_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& positions, const torch::Tensor& token_seq,
                              const torch::Tensor& slot_mapping, const torch::Tensor& ctx_slots,
                              torch::Tensor k_cache, torch::Tensor v_cache, int64_t nh, int64_t nkv, double scale) {
  if (half_cache(k_cache, v_cache, "paged_attention"))
    return paged_attention_impl<_Float16>(qkv, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache,
                                          v_cache, nh, nkv, scale);
  return paged_attention_impl<float>(qkv, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache, v_cache,
                                     nh, nkv, scale);
}

// A decoder layer's two halves in one call each (the same kernels as the separate ops, so the
// same values bitwise): at decode sizes each op dispatched from Python costs more than its
// arithmetic, and a layer was seven of them.
//   attention: x + paged_attention(rms_norm(x) @ wqkv^T) @ wo^T
torch::Tensor attn_block(const torch::Tensor& x, const torch::Tensor& norm, double eps, const torch::Tensor& wqkv,
                         const torch::Tensor& wo, const torch::Tensor& cos, const torch::Tensor& sin,
                         const torch::Tensor& positions, const torch::Tensor& token_seq,
                         const torch::Tensor& slot_mapping, const torch::Tensor& ctx_slots, torch::Tensor k_cache,
                         torch::Tensor v_cache, int64_t nh, int64_t nkv, double scale) {
  const auto qkv = skinny_linear(rms_norm(x, norm, eps), wqkv, c10::nullopt);
  const auto att = paged_attention(qkv, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache, v_cache, nh,
                                   nkv, scale);
  return skinny_linear(att, wo, x);
}

//   feed-forward: x + silu_mul(rms_norm(x) @ w_gate_up^T) @ w_down^T
torch::Tensor mlp_block(const torch::Tensor& x, const torch::Tensor& norm, double eps, const torch::Tensor& w_gate_up,
                        const torch::Tensor& w_down) {
  return skinny_linear(silu_mul(skinny_linear(rms_norm(x, norm, eps), w_gate_up, c10::nullopt)), w_down, x);
}

// Every decoder layer of a decode-sized pass in one call: the loop of attn_block and mlp_block
// (the same functions, so the same values bitwise) without a Python call and a dispatch for each
// of the 2L blocks. run [2L]: 1 where sub-layer s (attention 2i, feed-forward 2i + 1) runs, 0
// where a route skips it. Returns (x after the last layer, x before sub-layer save_at: the
// residual stream a later pass resumes from; save_at >= 2L: the last x; < 0: an empty tensor).
std::tuple<torch::Tensor, torch::Tensor> decoder_layers(
    const torch::Tensor& x, at::TensorList attn_norm, at::TensorList wqkv, at::TensorList wo, at::TensorList mlp_norm,
    at::TensorList w_gate_up, at::TensorList w_down, const torch::Tensor& cos, const torch::Tensor& sin,
    const torch::Tensor& positions, const torch::Tensor& token_seq, const torch::Tensor& slot_mapping,
    const torch::Tensor& ctx_slots, at::TensorList k_cache, at::TensorList v_cache, int64_t nh, int64_t nkv,
    double scale, double eps, c10::IntArrayRef run, int64_t save_at) {
  const int64_t L = int64_t(attn_norm.size());
  TORCH_CHECK(int64_t(wqkv.size()) == L && int64_t(wo.size()) == L && int64_t(mlp_norm.size()) == L &&
                  int64_t(w_gate_up.size()) == L && int64_t(w_down.size()) == L && int64_t(k_cache.size()) == L &&
                  int64_t(v_cache.size()) == L && int64_t(run.size()) == 2 * L,
              "decoder_layers: one of each per layer, and run [2L]");
  torch::Tensor h = x, prefix;
  for (int64_t i = 0; i < L; ++i) {
    if (save_at == 2 * i) prefix = h;
    if (run[2 * i])
      h = attn_block(h, attn_norm[i], eps, wqkv[i], wo[i], cos, sin, positions, token_seq, slot_mapping, ctx_slots,
                     k_cache[i], v_cache[i], nh, nkv, scale);
    if (save_at == 2 * i + 1) prefix = h;
    if (run[2 * i + 1]) h = mlp_block(h, mlp_norm[i], eps, w_gate_up[i], w_down[i]);
  }
  if (save_at >= 2 * L) prefix = h;
  if (!prefix.defined()) prefix = torch::empty({0}, x.options());
  return {h, prefix};
}

// The draft head's chained drafting (server/engine/drafters/head.py: `draft` is the contract and
// the reference), one call per speculative step. Written in torch ops a 5-token draft was ~60
// small ops per token, 3.4 of its 5.7 ms; here the six fp16 (or fp32) matrix reads are the cost.
// The keys and values of a sequence's committed pairs do not change, so the caller keeps them and
// passes only the pairs it has not seen processed:
//   kv_old [B, To, 2, H] rotated keys and values of earlier pairs, pos_old, valid_old [B, To];
//   h [B, Tn, H] the target's final hidden states of the new pairs, tok [B, Tn] the tokens after
//   them, pos, valid [B, Tn] (left padded; index Tn-1, the newest pair, valid);
//   embed [V, H] fp32, fc [H, 2H], qkv [3H, H], o [H, H], gate_up [2F, H], down [H, F],
//   out_embed [R, H] (all fp32, all fp16, or all Q8_0 blocks, int8 [N, K / 32 * 34]), norms [3, H] (attention, ffn, output), reduced_ids [R].
// Returns ids [B, S], the head's probability of each [B, S] (S = steps, or fewer once every row
// has drafted a token below stop_below (< 0: never) or one past which no draft pays, and
// min_tokens are drafted), and kv_new [B, Tn, 2, H], the new pairs' keys and values.
// costs (n_costs >= steps + 1 values, or none): r(1), r(2), ... the verification pass's cost by
// its tokens, which `draft_length.best_length` keeps the n drafts that maximise E(n) / r(n + 1)
// by. A row stops once no longer draft can beat its best n so far, even were every later token
// certain: E(m) <= E(n) + run(n) (m - n) for m > n, run the product of its tokens' probabilities.
// So the drafts it leaves out are ones verification would have cut (head.py `draft`).
template <typename W>
struct HeadWeights {
  const float* embed;
  const W *fc, *qkv, *o, *gate_up, *down, *out;
  const float* norms;
  const int64_t* reduced;
  int64_t H, F, R, heads, window;
};

struct HeadDraft {
  std::vector<int64_t> ids;  // [B, steps]
  std::vector<float> probs;  // [B, steps]
  int64_t done = 0;          // steps drafted
};

template <typename W>
static HeadDraft head_draft_impl(const HeadWeights<W>& hw, const float* kv_old, const int64_t* pos_old,
                                 const bool* valid_old, int64_t To, const float* hp, const int64_t* tokp,
                                 const int64_t* posp, const bool* validp, int64_t B, int64_t Tn, int64_t steps,
                                 double stop_below, int64_t min_tokens, float eps, float theta, float* kv_new,
                                 const double* costs, int64_t n_costs) {
  const int64_t H = hw.H, F = hw.F, R = hw.R, heads = hw.heads;
  const int64_t hd = H / heads, half = hd / 2, L = To + Tn + steps;
  const float scale = 1.f / std::sqrt(float(hd));
  const float *w_attn = hw.norms, *w_ffn = hw.norms + H, *w_out = hw.norms + 2 * H;
  auto rms = [&](const float* x, const float* w, float* o) { rms_row(x, w, o, H, eps); };
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(theta, -float(2 * i) / float(hd));
  auto rope = [&](float* x, int64_t p) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = float(p) * inv_freq[i], c = std::cos(a), s = std::sin(a);
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c - x2 * s;
      x[i + half] = x2 * c + x1 * s;
    }
  };
  // per row: rotated keys and values of every position it has seen, their positions and validity
  std::vector<float> kbuf(B * L * H), vbuf(B * L * H);
  std::vector<int64_t> kpos(B * L);
  std::vector<uint8_t> kvalid(B * L, 0);
  std::vector<int64_t> qpos(B);
  const int64_t M0 = B * Tn;  // rows of the largest projection
  std::vector<float> x2(M0 * 2 * H), z(M0 * H), a(M0 * H), qkv(M0 * 3 * H);
  std::vector<float> q(B * H), att(B * H), zlast(B * H), z1(B * H), gu(B * 2 * F), act(B * F), z2(B * H),
      hn(B * H), lg(B * R), sc(L);

  // fuse + project M rows: x2 = [rms(h) | rms(embed[tok])], z = x2 @ fc^T, qkv = rms(z, w_attn) @ qkv^T
  auto fuse_project = [&](const float* hrows, const int64_t* toks, int64_t M) {
    for (int64_t m = 0; m < M; ++m) {
      rms(hrows + m * H, nullptr, x2.data() + m * 2 * H);
      rms(hw.embed + toks[m] * H, nullptr, x2.data() + m * 2 * H + H);
    }
    skinny(x2.data(), hw.fc, z.data(), nullptr, M, 2 * H, H);
    for (int64_t m = 0; m < M; ++m) rms(z.data() + m * H, w_attn, a.data() + m * H);
    skinny(a.data(), hw.qkv, qkv.data(), nullptr, M, H, 3 * H);
  };
  // row b's slot j: the rotated key and the value of qkv row m, at position p
  auto store_kv = [&](int64_t b, int64_t j, int64_t m, int64_t p, bool ok) {
    float* k = kbuf.data() + (b * L + j) * H;
    std::memcpy(k, qkv.data() + m * 3 * H + H, H * sizeof(float));
    for (int64_t g = 0; g < heads; ++g) rope(k + g * hd, p);
    std::memcpy(vbuf.data() + (b * L + j) * H, qkv.data() + m * 3 * H + 2 * H, H * sizeof(float));
    kpos[b * L + j] = p;
    kvalid[b * L + j] = ok;
  };
  // row b's query (qkv row m, rotated at qpos[b]) into q
  auto take_query = [&](int64_t b, int64_t m) {
    std::memcpy(q.data() + b * H, qkv.data() + m * 3 * H, H * sizeof(float));
    for (int64_t g = 0; g < heads; ++g) rope(q.data() + b * H + g * hd, qpos[b]);
  };
  // attention of row b's query over its first n slots that lie within the window
  auto attend = [&](int64_t b, int64_t n) {
    const int64_t p = qpos[b];
    const float* qb = q.data() + b * H;
    for (int64_t g = 0; g < heads; ++g) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t d = p - kpos[b * L + j];
        const bool see = kvalid[b * L + j] && d >= 0 && d < hw.window;
        sc[j] = see ? dot(qb + g * hd, kbuf.data() + (b * L + j) * H + g * hd, hd) * scale : -INFINITY;
        mx = std::max(mx, sc[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = sc[j] == -INFINITY ? 0.f : std::exp(sc[j] - mx);
        sum += sc[j];
      }
      float* o = att.data() + b * H + g * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        if (sc[j] == 0.f) continue;
        const float w = sc[j] / sum;
        const float* v = vbuf.data() + (b * L + j) * H + g * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] += w * v[i];
      }
    }
  };
  // the rest of the layer for the B rows: zlast (residual stream) and att -> hn
  auto finish = [&]() {
    skinny(att.data(), hw.o, z1.data(), zlast.data(), B, H, H);
    for (int64_t b = 0; b < B; ++b) rms(z1.data() + b * H, w_ffn, a.data() + b * H);
    skinny(a.data(), hw.gate_up, gu.data(), nullptr, B, H, 2 * F);
    for (int64_t b = 0; b < B; ++b) {
      const float* g = gu.data() + b * 2 * F;
      for (int64_t i = 0; i < F; ++i) act[b * F + i] = g[i] / (1.f + std::exp(-g[i])) * g[F + i];
    }
    skinny(act.data(), hw.down, z2.data(), z1.data(), B, F, H);
    for (int64_t b = 0; b < B; ++b) rms(z2.data() + b * H, w_out, hn.data() + b * H);
  };

  // the window: the earlier pairs' keys and values as given, the new pairs' computed
  fuse_project(hp, tokp, M0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < To; ++t) {
      const float* src = kv_old + (b * To + t) * 2 * H;
      std::memcpy(kbuf.data() + (b * L + t) * H, src, H * sizeof(float));
      std::memcpy(vbuf.data() + (b * L + t) * H, src + H, H * sizeof(float));
      kpos[b * L + t] = pos_old[b * To + t];
      kvalid[b * L + t] = valid_old[b * To + t];
    }
    for (int64_t t = 0; t < Tn; ++t) {
      store_kv(b, To + t, b * Tn + t, posp[b * Tn + t], validp[b * Tn + t]);
      float* dst = kv_new + (b * Tn + t) * 2 * H;
      std::memcpy(dst, kbuf.data() + (b * L + To + t) * H, H * sizeof(float));
      std::memcpy(dst + H, vbuf.data() + (b * L + To + t) * H, H * sizeof(float));
    }
    const int64_t m = b * Tn + Tn - 1;  // the newest pair asks for the first draft
    qpos[b] = posp[m];
    take_query(b, m);
    std::memcpy(zlast.data() + b * H, z.data() + m * H, H * sizeof(float));
    attend(b, To + Tn);
  }
  finish();

  HeadDraft out;
  out.ids.assign(B * steps, 0);
  out.probs.assign(B * steps, 0.f);
  std::vector<uint8_t> alive(B, 1);
  // per row, for the cost rule: E(n), run(n) (the product of its drafts' probabilities) and the
  // best E(n) / r(n + 1) so far
  const bool priced = costs != nullptr && n_costs >= steps + 1;
  std::vector<double> expect(B, 1.0), chance(B, 1.0), ratio(B, priced ? 1.0 / costs[0] : 0.0);
  std::vector<int64_t> tnew(B);
  int64_t n = To + Tn;
  for (int64_t s = 0; s < steps; ++s) {
    skinny(hn.data(), hw.out, lg.data(), nullptr, B, H, R);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      // softmax's largest entry: its index (the first, as torch's max) and 1 / sum(exp(l - max))
      const float* l = lg.data() + b * R;
      int64_t best = 0;
      for (int64_t r = 1; r < R; ++r)
        if (l[r] > l[best]) best = r;
      float sum = 0.f;
      for (int64_t r = 0; r < R; ++r) sum += std::exp(l[r] - l[best]);
      const float p = 1.f / sum;
      tnew[b] = hw.reduced[best];
      out.ids[b * steps + s] = tnew[b];
      out.probs[b * steps + s] = p;
      if (stop_below >= 0.0) alive[b] = alive[b] && p >= float(stop_below);
      if (priced) {
        chance[b] *= std::min(1.0, std::max(0.0, double(p)));
        expect[b] += chance[b];
        ratio[b] = std::max(ratio[b], expect[b] / costs[s + 1]);
        bool pays = false;  // some longer draft could still beat the best (a relative margin: ties draft on)
        for (int64_t m = s + 2; m <= steps && !pays; ++m)
          pays = (expect[b] + chance[b] * double(m - s - 1)) / costs[m] > ratio[b] * (1.0 - 1e-9);
        alive[b] = alive[b] && pays;
      }
      any = any || alive[b];
    }
    out.done = s + 1;
    if (s + 1 == steps || ((stop_below >= 0.0 || priced) && s + 1 >= min_tokens && !any)) break;
    // the drafted token and hn form the next pair of each row: its key, value and query
    fuse_project(hn.data(), tnew.data(), B);
    for (int64_t b = 0; b < B; ++b) {
      qpos[b] += 1;
      store_kv(b, n, b, qpos[b], true);
      take_query(b, b);
    }
    ++n;
    for (int64_t b = 0; b < B; ++b) attend(b, n);
    std::memcpy(zlast.data(), z.data(), B * H * sizeof(float));
    finish();
  }
  return out;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> head_draft(
    const torch::Tensor& kv_old, const torch::Tensor& pos_old, const torch::Tensor& valid_old, const torch::Tensor& h,
    const torch::Tensor& tok, const torch::Tensor& pos, const torch::Tensor& valid, const torch::Tensor& embed,
    const torch::Tensor& fc, const torch::Tensor& qkv, const torch::Tensor& o, const torch::Tensor& gate_up,
    const torch::Tensor& down, const torch::Tensor& out_embed, const torch::Tensor& norms,
    const torch::Tensor& reduced_ids, int64_t heads, int64_t window, int64_t steps, double stop_below,
    int64_t min_tokens, double eps, double theta, const c10::optional<torch::Tensor>& costs) {
  TORCH_CHECK(h.dim() == 3 && h.scalar_type() == at::kFloat && h.size(1) > 0, "head_draft: h fp32 [B, Tn, H]");
  torch::Tensor cc;
  if (costs.has_value()) {
    cc = costs->contiguous();
    TORCH_CHECK(cc.scalar_type() == at::kDouble && cc.dim() == 1 && cc.numel() >= steps + 1,
                "head_draft: costs float64 [steps + 1] or more");
    const double* c = cc.data_ptr<double>();
    for (int64_t i = 0; i < cc.numel(); ++i) TORCH_CHECK(c[i] > 0.0, "head_draft: costs positive");
  }
  const int64_t B = h.size(0), Tn = h.size(1), H = h.size(2);
  TORCH_CHECK(tok.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && valid.scalar_type() == at::kBool &&
              tok.dim() == 2 && tok.size(0) == B && tok.size(1) == Tn && pos.sizes() == tok.sizes() &&
              valid.sizes() == tok.sizes(), "head_draft: tok, pos int64 and valid bool, [B, Tn]");
  TORCH_CHECK(kv_old.scalar_type() == at::kFloat && kv_old.dim() == 4 && kv_old.size(0) == B && kv_old.size(2) == 2 &&
              kv_old.size(3) == H, "head_draft: kv_old fp32 [B, To, 2, H]");
  const int64_t To = kv_old.size(1);
  TORCH_CHECK(pos_old.scalar_type() == at::kLong && valid_old.scalar_type() == at::kBool && pos_old.dim() == 2 &&
              pos_old.size(0) == B && pos_old.size(1) == To && valid_old.sizes() == pos_old.sizes(),
              "head_draft: pos_old int64 and valid_old bool, [B, To]");
  TORCH_CHECK(embed.scalar_type() == at::kFloat && embed.is_contiguous() && embed.dim() == 2 && embed.size(1) == H,
              "head_draft: embed fp32 [V, H]");
  const auto dt = fc.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kChar,
              "head_draft: matrices fp32, fp16 or Q8_0 blocks (int8 [N, K / 32 * 34])");
  for (const auto* t : {&fc, &qkv, &o, &gate_up, &down, &out_embed}) {
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous() && t->dim() == 2, "head_draft: matrices of one dtype, contiguous");
    TORCH_CHECK(dt != at::kChar || t->size(1) % int64_t(sizeof(Q8Block)) == 0, "head_draft: Q8_0 rows of whole blocks");
  }
  // a matrix's K: its columns, or for Q8_0 blocks 32 per 34 bytes
  auto cols = [&](const torch::Tensor& t) { return dt == at::kChar ? t.size(1) / int64_t(sizeof(Q8Block)) * 32 : t.size(1); };
  const int64_t F = cols(down), R = out_embed.size(0);
  TORCH_CHECK(fc.size(0) == H && cols(fc) == 2 * H && qkv.size(0) == 3 * H && cols(qkv) == H && o.size(0) == H &&
              cols(o) == H && gate_up.size(0) == 2 * F && cols(gate_up) == H && down.size(0) == H &&
              cols(out_embed) == H, "head_draft: matrix shapes");
  TORCH_CHECK(dt != at::kChar || (H % 32 == 0 && F % 32 == 0), "head_draft: Q8_0 blocks need H and F multiples of 32");
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.is_contiguous() && norms.numel() == 3 * H,
              "head_draft: norms fp32 [3, H]");
  TORCH_CHECK(reduced_ids.scalar_type() == at::kLong && reduced_ids.numel() == R, "head_draft: reduced_ids int64 [R]");
  TORCH_CHECK(heads > 0 && H % heads == 0 && (H / heads) % 2 == 0 && steps > 0, "head_draft: heads, steps");
  auto kvc = kv_old.contiguous();
  auto poc = pos_old.contiguous();
  auto voc = valid_old.contiguous();
  auto hc = h.contiguous();
  auto tc = tok.contiguous();
  auto pc = pos.contiguous();
  auto vc = valid.contiguous();
  auto rc = reduced_ids.contiguous();
  const int64_t V = embed.size(0);
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * Tn; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "head_draft: token id out of range");
  const int64_t* rp = rc.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < V, "head_draft: reduced id out of range");
  auto kv_new = torch::empty({B, Tn, 2, H}, hc.options());
  auto run = [&](auto* tag) {
    using Wt = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    auto p = [](const torch::Tensor& t) { return reinterpret_cast<const Wt*>(t.data_ptr()); };
    const HeadWeights<Wt> hw{embed.data_ptr<float>(), p(fc), p(qkv), p(o), p(gate_up), p(down), p(out_embed),
                             norms.data_ptr<float>(), rp, H, F, R, heads, window};
    return head_draft_impl(hw, kvc.data_ptr<float>(), poc.data_ptr<int64_t>(), voc.data_ptr<bool>(), To,
                           hc.data_ptr<float>(), tp, pc.data_ptr<int64_t>(), vc.data_ptr<bool>(), B, Tn, steps,
                           stop_below, min_tokens, float(eps), float(theta), kv_new.data_ptr<float>(),
                           cc.defined() ? cc.data_ptr<double>() : nullptr, cc.defined() ? cc.numel() : 0);
  };
  const HeadDraft d = dt == at::kHalf   ? run(static_cast<const _Float16*>(nullptr))
                      : dt == at::kChar ? run(static_cast<const Q8Block*>(nullptr))
                                        : run(static_cast<const float*>(nullptr));
  auto idt = torch::empty({B, d.done}, torch::dtype(torch::kLong));
  auto prt = torch::empty({B, d.done}, torch::dtype(torch::kFloat));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < d.done; ++s) {
      idt.data_ptr<int64_t>()[b * d.done + s] = d.ids[b * steps + s];
      prt.data_ptr<float>()[b * d.done + s] = d.probs[b * steps + s];
    }
  return {idt, prt, kv_new};
}

// The fewest tokens a pass must have for the skinny GEMM to read a Q4_1 matrix faster in GGUF's
// layout (one row's 20-byte blocks after another) than four rows interleaved; 0: never. On AVX2
// hosts passes of 3 tokens and more run one row at a time, and there the interleaved layout took
// 1.09-1.18x GGUF's time at 3-6 tokens; at one and two tokens, which read four and two interleaved
// rows at a time, 0.94x and 1.00x (the bundled model's layers, the layouts taking turns in one
// process, Zen 3: `benchmarks/cpu_kernels.py --only layouts`). A shift by a constant instead of a
// count in a register did not close the gap. The AVX-512 tiles read whole interleaved groups, and
// there the interleaved layout was the faster at every width: 0.78-0.97x GGUF's time at 1-16 tokens
// (the same command, an Intel Xeon with AVX-512). On a Zen 4 EPYC (AVX-512 on 256-bit units) it
// was 0.95 / 0.84 / 0.91 / 0.97 / 1.00 / 1.03 / 1.02x at 1-6 and 8 tokens: GGUF's layout would save
// 2-3% of the layer kernels' time on 6-token and wider passes, which greedy steps rarely verify,
// for 66 MB more memory, so AVX-512 hosts keep the one layout.
int64_t rows_layout_from() {
#ifdef VIA_SD_AVX2_TILES
  return 3;
#else
  return 0;
#endif
}

TORCH_LIBRARY(via_sd_cpu, m) {
  m.def("rows_layout_from() -> int", &rows_layout_from);
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? residual=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("rotate_store(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slot_mapping, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int nh, int nkv) -> Tensor");
  m.def("greedy_linear(Tensor x, Tensor w16, Tensor w, Tensor err, int max_exact) -> (Tensor, Tensor)");
  m.def("paged_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor token_seq, "
        "Tensor slot_mapping, Tensor ctx_slots, Tensor(a!) k_cache, Tensor(b!) v_cache, int nh, int nkv, "
        "float scale) -> Tensor");
  m.def("attn_block(Tensor x, Tensor norm, float eps, Tensor wqkv, Tensor wo, Tensor cos, Tensor sin, "
        "Tensor positions, Tensor token_seq, Tensor slot_mapping, Tensor ctx_slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int nh, int nkv, float scale) -> Tensor");
  m.def("mlp_block(Tensor x, Tensor norm, float eps, Tensor w_gate_up, Tensor w_down) -> Tensor");
  m.def("decoder_layers(Tensor x, Tensor[] attn_norm, Tensor[] wqkv, Tensor[] wo, Tensor[] mlp_norm, "
        "Tensor[] w_gate_up, Tensor[] w_down, Tensor cos, Tensor sin, Tensor positions, Tensor token_seq, "
        "Tensor slot_mapping, Tensor ctx_slots, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int nh, int nkv, "
        "float scale, float eps, int[] run, int save_at) -> (Tensor, Tensor)");
  m.def("head_draft(Tensor kv_old, Tensor pos_old, Tensor valid_old, Tensor h, Tensor tok, Tensor pos, Tensor valid, "
        "Tensor embed, Tensor fc, Tensor qkv, Tensor o, Tensor gate_up, Tensor down, Tensor out_embed, Tensor norms, "
        "Tensor reduced_ids, int heads, int window, int steps, float stop_below, int min_tokens, float eps, "
        "float theta, Tensor? costs=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(via_sd_cpu, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotate_store", &rotate_store);
  m.impl("greedy_linear", &greedy_linear);
  m.impl("paged_attention", &paged_attention);
  m.impl("attn_block", &attn_block);
  m.impl("mlp_block", &mlp_block);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("head_draft", &head_draft);
}
