// AVX2 + FMA kernels (compiled with -mavx2 -mfma): fp32 decode and dot products, 8 lanes at a time.

#include <immintrin.h>

#include "mxfp4_kernels.h"

namespace gptoss_cpu {
namespace {

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace

void decode_rows_f32_avx2(const Projection& p, int64_t r0, int64_t nr, float* dst) {
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i low3 = _mm256_set1_epi32(7);
  for_each_row_superblock(p, r0, nr, dst, [&](float* out, const uint8_t* c, const uint8_t* s) {
    for (int chunk = 0; chunk < kStepBytes / kChunkBytes; ++chunk)
      for (int half = 0; half < 2; ++half) {  // bytes 8 half..: blocks 2 half and 2 half + 1
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + chunk * kChunkBytes + 8 * half));
        const __m256i v = _mm256_cvtepu8_epi32(bytes);
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
        const __m256i hi = _mm256_srli_epi32(v, 4);
        // Magnitude from the low 3 bits, sign from bit 3 moved to the float sign bit.
        __m256 wl = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(lo, low3));
        __m256 wh = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(hi, low3));
        wl = _mm256_xor_ps(wl, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(lo, 3), 31)));
        wh = _mm256_xor_ps(wh, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(hi, 3), 31)));
        const float s0 = e8m0(s[2 * half]), s1 = e8m0(s[2 * half + 1]);
        const __m256 scale = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
        float* o = out + 32 * chunk + 8 * half;
        _mm256_storeu_ps(o, _mm256_mul_ps(wl, scale));
        _mm256_storeu_ps(o + 16, _mm256_mul_ps(wh, scale));
      }
  });
}

float dot_f32_avx2(const float* w, const float* x, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {  // k is a multiple of 128
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  return hsum(_mm256_add_ps(a0, a1));
}

}  // namespace gptoss_cpu
