// A probe, not an engine kernel: the skinny GEMM of a verification pass on AMX's int8 tiles, with
// Q4_1 weights and fp32 activations, to measure what a pass over a few tokens could cost on a CPU
// with AMX (benchmarks/amx_probe.py builds and drives it).
//
// Each Q4_1 block of 32 along K is w_k = d * q_k + m (q_k in 0..15), so a block's share of a dot
// product is d * sum_k x_k q_k + m * sum_k x_k. The first sum is taken exactly in integers: the
// token's 32 values are written in fixed point against the block's largest (27 bits, as four
// signed base-128 digits), each digit row is multiplied by the block's q on the tile unit (int32
// sums, exact), and the four sums are joined in fp32. A token's row is never mixed with another's,
// so its result does not depend on how many tokens share the pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool request_amx() {
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

void configure(int rows_a) {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette_id = 1;
  c.rows[0] = rows_a;  // A: digit rows x 32 bytes of K
  c.colsb[0] = 32;
  for (int t = 1; t <= 3; ++t) {  // B: 8 rows of quads x 16 columns
    c.rows[t] = 8;
    c.colsb[t] = 64;
  }
  for (int t = 4; t <= 6; ++t) {  // C: digit rows x 16 int32
    c.rows[t] = rows_a;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

}  // namespace

// q [N, K] uint8 (0..15) -> tiles [N/16, K/32, 8, 64]: row r, byte c holds q[16j + c/4, 32b + 4r + c%4]
torch::Tensor amx_pack(torch::Tensor q) {
  const int64_t N = q.size(0), K = q.size(1), KB = K / 32;
  auto out = torch::empty({N / 16, KB, 8, 64}, q.options());
  const uint8_t* s = q.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t j = 0; j < N / 16; ++j)
    for (int64_t b = 0; b < KB; ++b)
      for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 64; ++c)
          o[((j * KB + b) * 8 + r) * 64 + c] = s[(16 * j + c / 4) * K + 32 * b + 4 * r + c % 4];
  return out;
}

// x [M, K] fp32 (M <= 4), tiles from amx_pack, dm [N/16, K/32, 2, 16] fp32 (d then m of 16 rows)
torch::Tensor amx_q4_linear(torch::Tensor x, torch::Tensor tiles, torch::Tensor dm) {
  static const bool ok = request_amx();
  TORCH_CHECK(ok, "AMX tile state not granted");
  const int64_t M = x.size(0), K = x.size(1), KB = K / 32, NJ = tiles.size(0), N = NJ * 16;
  TORCH_CHECK(M >= 1 && M <= 4 && K % 32 == 0, "amx_q4_linear: 1..4 tokens, K a multiple of 32");
  const float* xp = x.data_ptr<float>();
  // the tokens' digits, per block: [KB][4M rows][32], row 4m + i is digit i of token m
  std::vector<int8_t> digits(KB * 4 * M * 32);
  std::vector<float> scale(KB * M), bsum(KB * M);
  for (int64_t b = 0; b < KB; ++b)
    for (int64_t m = 0; m < M; ++m) {
      const float* v = xp + m * K + 32 * b;
      float mx = 0.f, s = 0.f;
      for (int k = 0; k < 32; ++k) {
        mx = std::max(mx, std::fabs(v[k]));
        s += v[k];
      }
      int e = 0;
      std::frexp(mx, &e);  // mx < 2^e
      scale[b * M + m] = std::ldexp(1.f, e - 26);
      bsum[b * M + m] = s;
      for (int k = 0; k < 32; ++k) {
        int64_t X = std::llrint(std::ldexp(double(v[k]), 26 - e));  // |X| <= 2^26: four digits hold it
        int8_t d[4];
        for (int i = 3; i >= 0; --i) {
          const int64_t r = ((X + 64) & 127) - 64;  // balanced digit in -64..63
          d[i] = int8_t(r);
          X = (X - r) / 128;
        }
        for (int i = 0; i < 4; ++i) digits[((b * 4 * M) + 4 * m + i) * 32 + k] = d[i];
      }
    }
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const float* dmp = dm.data_ptr<float>();
  const int rows = int(4 * M);
  at::parallel_for(0, NJ, 8, [&](int64_t j0, int64_t j1) {
    request_amx();
    configure(rows);
    alignas(64) int32_t buf[3][16][16];
    for (int64_t j = j0; j < j1; j += 3) {
      const int nt = int(std::min<int64_t>(3, j1 - j));
      __m512 acc[3][4];
      for (int t = 0; t < 3; ++t)
        for (int m = 0; m < 4; ++m) acc[t][m] = _mm512_setzero_ps();
      for (int64_t b = 0; b < KB; ++b) {
        _tile_loadd(0, digits.data() + b * 4 * M * 32, 32);
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_loadd(1, tp + ((j * KB + b) * 8) * 64, 64);
        _tile_dpbsud(4, 0, 1);
        if (nt > 1) {
          _tile_loadd(2, tp + (((j + 1) * KB + b) * 8) * 64, 64);
          _tile_dpbsud(5, 0, 2);
        }
        if (nt > 2) {
          _tile_loadd(3, tp + (((j + 2) * KB + b) * 8) * 64, 64);
          _tile_dpbsud(6, 0, 3);
        }
        _tile_stored(4, buf[0], 64);
        if (nt > 1) _tile_stored(5, buf[1], 64);
        if (nt > 2) _tile_stored(6, buf[2], 64);
        for (int t = 0; t < nt; ++t) {
          const float* dmt = dmp + ((j + t) * KB + b) * 32;
          const __m512 dv = _mm512_loadu_ps(dmt), mv = _mm512_loadu_ps(dmt + 16);
          for (int64_t m = 0; m < M; ++m) {
            const __m512 s1 = _mm512_cvtepi32_ps(_mm512_load_si512(buf[t][4 * m]));
            const __m512 s2 = _mm512_cvtepi32_ps(_mm512_load_si512(buf[t][4 * m + 1]));
            const __m512 s3 = _mm512_cvtepi32_ps(_mm512_load_si512(buf[t][4 * m + 2]));
            const __m512 s4 = _mm512_cvtepi32_ps(_mm512_load_si512(buf[t][4 * m + 3]));
            __m512 T = _mm512_fmadd_ps(s1, _mm512_set1_ps(2097152.f), _mm512_mul_ps(s2, _mm512_set1_ps(16384.f)));
            T = _mm512_add_ps(T, _mm512_fmadd_ps(s3, _mm512_set1_ps(128.f), s4));
            T = _mm512_mul_ps(T, _mm512_set1_ps(scale[b * M + m]));
            acc[t][m] = _mm512_fmadd_ps(dv, T, acc[t][m]);
            acc[t][m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(bsum[b * M + m]), acc[t][m]);
          }
        }
      }
      for (int t = 0; t < nt; ++t)
        for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(op + m * N + (j + t) * 16, acc[t][m]);
    }
    _tile_release();
  });
  return out;
}

TORCH_LIBRARY(via_sd_amx_probe, lib) {
  lib.def("pack(Tensor q) -> Tensor", &amx_pack);
  lib.def("linear(Tensor x, Tensor tiles, Tensor dm) -> Tensor", &amx_q4_linear);
}
