// CPU kernels for decode-sized passes (a few tokens): the skinny GEMM, RMSNorm, SiLU-and-multiply
// and paged attention with rotary embedding, so that a decoder layer is seven calls.
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

#include <cmath>
#include <cstring>
#include <vector>

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }

static inline float reduce16(v16 a) {
  float s[16];
  __builtin_memcpy(s, &a, sizeof(s));
  float t8[8], t4[4];
  for (int i = 0; i < 8; ++i) t8[i] = s[i] + s[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

// R weight rows x MB tokens, all of K.
template <int R, int MB>
static inline void tile(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                        const float* __restrict__ res, int64_t K, int64_t N, int64_t n, int64_t m) {
  v16 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = v16{};
  const int64_t K16 = K & ~int64_t(15);
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
    for (int j = 0; j < MB; ++j) {
      float s = reduce16(acc[r][j]);
      const float* wr = w + (n + r) * K;
      const float* xr = x + (m + j) * K;
      for (int64_t k = K16; k < K; ++k) s += wr[k] * xr[k];
      const int64_t o = (m + j) * N + n + r;
      out[o] = res ? res[o] + s : s;
    }
}

template <int R>
static void rows(const float* x, const float* w, float* out, const float* res, int64_t M, int64_t K, int64_t N,
                 int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<R, 4>(x, w, out, res, K, N, n, m);
  switch (M - m) {
    case 3: tile<R, 3>(x, w, out, res, K, N, n, m); break;
    case 2: tile<R, 2>(x, w, out, res, K, N, n, m); break;
    case 1: tile<R, 1>(x, w, out, res, K, N, n, m); break;
    default: break;
  }
}

template <int R>
static void run_rows(const float* xp, const float* wp, float* op, const float* rp, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = N / R;
  at::parallel_for(0, tiles, 32 / R, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rows<R>(xp, wp, op, rp, M, K, N, t * R);
  });
  for (int64_t n = tiles * R; n < N; ++n) rows<1>(xp, wp, op, rp, M, K, N, n);
}

// out = x @ w^T (+ residual): the residual add of a decoder layer folded into the store.
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "skinny_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(x.size(1) == w.size(1), "skinny_linear: K mismatch");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  torch::Tensor rc;
  const float* rp = nullptr;
  if (residual.has_value()) {
    rc = residual->contiguous();
    TORCH_CHECK(rc.scalar_type() == at::kFloat && rc.size(0) == M && rc.size(1) == N, "skinny_linear: residual [M, N]");
    rp = rc.data_ptr<float>();
  }
  // few tokens: more rows in flight (8 independent streams and accumulator chains); more tokens:
  // 4 rows x 4 tokens, 16 accumulators in registers
  if (M <= 2) {
    run_rows<8>(xp, wp, op, rp, M, K, N);
  } else {
    run_rows<4>(xp, wp, op, rp, M, K, N);
  }
  return out;
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
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * H;
    float ss = 0.f;
    for (int64_t h = 0; h < H; ++h) ss += r[h] * r[h];
    const float inv = 1.f / std::sqrt(ss / float(H) + float(eps));
    float* o = op + m * H;
    for (int64_t h = 0; h < H; ++h) o[h] = r[h] * inv * wp[h];
  }
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

// silu(g) * u for gu = [g | u] along the last axis: [M, 2I] -> [M, I].
torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.size(1) % 2 == 0, "silu_mul: fp32 [M, 2I]");
  auto c = gu.contiguous();
  const int64_t M = c.size(0), I = c.size(1) / 2;
  auto out = torch::empty({M, I}, c.options());
  const float* p = c.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* g = p + m * 2 * I;
    const float* u = g + I;
    float* om = o + m * I;
    for (int64_t i = 0; i < I; ++i) om[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  return out;
}

// Rotary embedding, K/V store into the paged cache, and causal attention over each token's
// sequence context read in place through its slots (no gather, no padding).
//   qkv        [N, (nh + 2 nkv) hd]   this layer's projections of the N new tokens
//   cos, sin   [P, hd]                the rotary tables; row = position
//   positions  [N]   token_seq [N] (row of ctx_slots)   slot_mapping [N] (where K/V go)
//   ctx_slots  [B, L] cache slot of each context position of each sequence
// Token t attends to positions 0..positions[t] of its sequence. Grouped-query: head h reads K/V
// head h / (nh / nkv). Returns [N, nh hd].
torch::Tensor paged_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& positions, const torch::Tensor& token_seq,
                              const torch::Tensor& slot_mapping, const torch::Tensor& ctx_slots,
                              torch::Tensor k_cache, torch::Tensor v_cache, int64_t nh, int64_t nkv, double scale) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "paged_attention: fp32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: contiguous caches");
  auto q3 = qkv.contiguous();
  auto cs = cos.contiguous();
  auto sn = sin.contiguous();
  auto pos = positions.contiguous();
  auto seq = token_seq.contiguous();
  auto slots = slot_mapping.contiguous();
  auto ctx = ctx_slots.contiguous();
  const int64_t N = q3.size(0);
  const int64_t hd = k_cache.size(2);
  const int64_t half = hd / 2;
  const int64_t width = (nh + 2 * nkv) * hd;
  TORCH_CHECK(q3.size(1) == width, "paged_attention: qkv width");
  const int64_t L = ctx.size(1);
  const int64_t G = nh / nkv;
  const float* qp = q3.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  const int64_t* seqp = seq.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const int64_t* ctxp = ctx.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t row = nkv * hd;  // floats per cache slot

  auto rotate = [&](const float* x, const float* c, const float* s, float* out) {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * c[i] - x[i + half] * s[i];
      out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
  };
  // rotated queries, and K/V of the new tokens into the cache (before any token reads them)
  std::vector<float> q(N * nh * hd);
  for (int64_t t = 0; t < N; ++t) {
    const float* src = qp + t * width;
    const float* c = cp + posp[t] * hd;
    const float* s = sp + posp[t] * hd;
    for (int64_t h = 0; h < nh; ++h) rotate(src + h * hd, c, s, q.data() + (t * nh + h) * hd);
    float* kd = kc + slp[t] * row;
    float* vd = vc + slp[t] * row;
    for (int64_t h = 0; h < nkv; ++h) {
      rotate(src + (nh + h) * hd, c, s, kd + h * hd);
      std::memcpy(vd + h * hd, src + (nh + nkv + h) * hd, hd * sizeof(float));
    }
  }
  auto out = torch::empty({N, nh * hd}, q3.options());
  float* op = out.data_ptr<float>();
  const float sc = float(scale);
  auto work = [&](int64_t b0, int64_t b1) {
    std::vector<float> p(L);
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t t = item / nh, h = item % nh, g = h / G;
      const int64_t n_ctx = posp[t] + 1;
      const int64_t* cs_row = ctxp + seqp[t] * L;
      const float* qv = q.data() + (t * nh + h) * hd;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n_ctx; ++j) {
        const float* kv = kc + cs_row[j] * row + g * hd;
        p[j] = dot(qv, kv, hd) * sc;
        mx = p[j] > mx ? p[j] : mx;
      }
      float den = 0.f;
      for (int64_t j = 0; j < n_ctx; ++j) {
        p[j] = std::exp(p[j] - mx);
        den += p[j];
      }
      float* o = op + t * nh * hd + h * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
      for (int64_t j = 0; j < n_ctx; ++j) {
        const float* vv = vc + cs_row[j] * row + g * hd;
        const float pj = p[j];
        for (int64_t i = 0; i < hd; ++i) o[i] += pj * vv[i];
      }
      const float inv = 1.f / den;
      for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
    }
  };
  const int64_t items = N * nh;
  // a parallel region pays off only for long contexts or many tokens
  if (items * L * hd >= (int64_t(1) << 17)) {
    at::parallel_for(0, items, 1, work);
  } else {
    work(0, items);
  }
  return out;
}

TORCH_LIBRARY(via_sd_cpu, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? residual=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("paged_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor token_seq, "
        "Tensor slot_mapping, Tensor ctx_slots, Tensor(a!) k_cache, Tensor(b!) v_cache, int nh, int nkv, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(via_sd_cpu, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("paged_attention", &paged_attention);
}
