// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni).
//
// Small batches (up to 23 tokens per expert): int8 dot products (vpdpbusd). A code c becomes the unsigned
// byte 2 * E2M1(c) + 12 (0..24, one vpshufb); activations are quantised per 32-element block to int8 with
// an fp32 scale. Each superblock's dot products start from -12 * (sum of the block's int8 activations),
// which removes the +12 offset, and give 2 * dot per (row, block) lane; the block scales carry the 1/2.
// Large batches: tiles decoded to bf16 for ATen's GEMM (oneDNN: AMX or AVX-512 BF16 where present).

#include <immintrin.h>

#include <cmath>

#include "mxfp4_kernels.h"

namespace gptoss_cpu {
namespace {

constexpr int kPrefetchBytes = 8192;  // software prefetch distance on the code stream, into L2 (past page ends)

// 16 E8M0 bytes as 16 fp32 lanes: 2**(s - 127) from the exponent bits (0 flushes 2**-127 to zero), 0xFF NaN.
__m512 e8m0_lanes(__m128i bytes) {
  const __m512i e = _mm512_cvtepu8_epi32(bytes);
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255));  // the shift made it +inf
  return __builtin_expect(nan != 0, 0) ? _mm512_mask_mov_ps(f, nan, _mm512_set1_ps(NAN)) : f;
}

}  // namespace

void decode_rows_bf16_avx512(const Projection& p, int64_t r0, int64_t nr, uint16_t* dst) {
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  const __m128i by_block = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for_each_row_superblock(p, r0, nr, dst, [&](uint16_t* out, const uint8_t* c, const uint8_t* s) {
    int32_t word;
    std::memcpy(&word, s, sizeof(word));
    const __m512 scale = e8m0_lanes(_mm_shuffle_epi8(_mm_cvtsi32_si128(word), by_block));  // lane 4j + b: block j
    for (int chunk = 0; chunk < kStepBytes / kChunkBytes; ++chunk) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + chunk * kChunkBytes)));
      const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, nibble), lut), scale);
      const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), scale);
      // cvtne2ps puts its second operand in the low half: positions 32 chunk.. (low nibbles), then + 16.
      _mm512_storeu_si512(out + 32 * chunk, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  });
}

// The scale carries x 0.5 (the codes are 2 * E2M1) and the offset is -12 * the sum of the block's codes.
void quantise_rows_avx512(const float* const* src, int64_t n, int64_t k_real, int64_t k, int8_t* q, float* scale,
                          int32_t* offset) {
  const int64_t blocks = k / kBlock;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < blocks; ++g) {
      const int64_t e0 = g * kBlock;
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      if (e0 < k_real) {  // k_real is a multiple of 32
        a = _mm512_loadu_ps(src[t] + e0);
        b = _mm512_loadu_ps(src[t] + e0 + 16);
      }
      const bool finite = (_mm512_fpclass_ps_mask(a, 0x99) | _mm512_fpclass_ps_mask(b, 0x99)) == 0;
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
      alignas(16) int8_t codes[kBlock];
      _mm_store_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(qa));
      _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtsepi32_epi8(qb));
      int8_t* dst = q + t * k + kernel_position(e0);  // chunk i of the block goes 16 bytes after chunk i - 1
      for (int i = 0; i < kBlock / 4; ++i) std::memcpy(dst + 16 * i, codes + 4 * i, 4);
      scale[t * blocks + g] = finite ? amax / 127.0f * 0.5f : NAN;
      offset[t * blocks + g] = -12 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

namespace {

// 16 bytes repeated in each 128-bit lane: a chunk of activations (or 4 ints) for all 4 rows of a group.
__m512i chunk16(const void* a) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(a)));
}

// T tokens share each decoded step: the step's 8 code vectors and T accumulators stay in registers.
template <int T>
void project_vnni_t(const Projection& p, int64_t row_begin, int64_t row_end) {
  const int64_t supers = p.k / kSuper, blocks = p.k / kBlock;
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int8_t* q = static_cast<const int8_t*>(p.act);
  for (int64_t group = row_begin / kGroupRows; group < row_end / kGroupRows; ++group) {
    for (int64_t t0 = 0; t0 < p.n; t0 += T) {
      const int64_t nt = p.n - t0 < T ? p.n - t0 : T;
      int64_t tok[T];
      for (int t = 0; t < T; ++t) tok[t] = t0 + (t < nt ? t : 0);  // missing tokens repeat the first
      __m512 acc[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < supers; ++sb) {
        const uint8_t* c = step_codes(p, group, sb);
        __m512i w[8];  // w[i]: chunk i of kernel order, lane 4r + j = row r's block j
        for (int chunk = 0; chunk < 4; ++chunk) {
          _mm_prefetch(reinterpret_cast<const char*>(c + chunk * kChunkBytes + kPrefetchBytes), _MM_HINT_T2);
          const __m512i v = _mm512_loadu_si512(c + chunk * kChunkBytes);
          w[2 * chunk] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibble));
          w[2 * chunk + 1] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
        const __m512 wscale = e8m0_lanes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step_scales(p, group, sb))));
        for (int t = 0; t < T; ++t) {
          const int8_t* x = q + tok[t] * p.k + sb * kSuper;
          const int64_t blk = tok[t] * blocks + sb * kSuperBlocks;
          __m512i d0 = chunk16(p.act_offset + blk), d1 = _mm512_setzero_si512();  // two chains for latency
          for (int i = 0; i < 8; i += 2) {
            d0 = _mm512_dpbusd_epi32(d0, w[i], chunk16(x + 16 * i));
            d1 = _mm512_dpbusd_epi32(d1, w[i + 1], chunk16(x + 16 * (i + 1)));
          }
          const __m512 scale = _mm512_mul_ps(wscale, _mm512_broadcast_f32x4(_mm_loadu_ps(p.act_scale + blk)));
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), scale, acc[t]);
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, acc[t]);
        for (int r = 0; r < kGroupRows; ++r) {
          const int64_t row = group * kGroupRows + r;
          const float* l = lanes + 4 * r;
          p.out[(t0 + t) * p.rows + row] = l[0] + l[1] + l[2] + l[3] + p.bias[row];
        }
      }
    }
  }
}

}  // namespace

void project_vnni_avx512(const Projection& p, int64_t row_begin, int64_t row_end) {
  if (p.n == 1) return project_vnni_t<1>(p, row_begin, row_end);
  if (p.n == 2) return project_vnni_t<2>(p, row_begin, row_end);
  return project_vnni_t<4>(p, row_begin, row_end);
}

}  // namespace gptoss_cpu
