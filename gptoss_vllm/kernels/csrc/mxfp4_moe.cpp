// Fused MXFP4 MoE for CPUs: the gpt-oss expert MLP computed straight from MXFP4 weights.
//
// Per expert, for the tokens routed to it: h = x W13^T + b13, the gpt-oss SwiGLU variant,
// y = act W2^T + b2, then out[token] += routing_weight * y.
//
// Weights are pre-packed once at load time (mxfp4_prepack), still 4.25 bits per weight: each row is cut
// into superblocks of 4 MXFP4 blocks (128 elements) held in 64 bytes, byte j carrying element j in its low
// nibble and element j + 64 in its high nibble, with the row's E8M0 scales beside it. One 64-byte load, a
// mask and a shift then give 128 codes in natural order: no shuffles on the activations, no cross-lane
// permutes on the weights. Rows are padded with zero blocks to whole superblocks.
//
// ISA paths, chosen at run time: AVX-512 (int8 VNNI dot products at small batches, BF16 tiles for ATen's
// GEMM at large ones), AVX2+FMA (fp32), and a portable one. All accumulate in fp32. Threads come from
// ATen's pool (torch.get_num_threads()).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GPTOSS_X86 1
#endif

namespace {

constexpr int kBlock = 32;         // elements per MXFP4 block
constexpr int kBlockBytes = 16;    // bytes per checkpoint block
constexpr int kSuper = 128;        // elements per packed superblock (4 blocks)
constexpr int kSuperBytes = 64;    // bytes per packed superblock
constexpr int kSuperBlocks = kSuper / kBlock;
constexpr uint8_t kPadScale = 127;  // scale of padding blocks (1.0; their codes are zero)
constexpr int kRows = 4;           // weight rows decoded together on the fp32 paths
constexpr int kPrefetchBytes = 8192;  // software prefetch distance on each row stream, into L2 (past page ends)
constexpr int kTileRows = 512;     // rows decoded per GEMM tile: oneDNN repacks every tile, so few large calls
// From this many tokens per expert the kernel decodes tiles and uses ATen's GEMM; the caller passes it
// (GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS, default 24: the measured crossover). <= 0 turns the GEMM path off, which
// makes every token's result independent of how many other tokens share its expert (batch invariance).

inline int64_t padded(int64_t k) { return (k + kSuper - 1) / kSuper * kSuper; }

const float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 byte -> float: 2**(s - 127) built from its bits (s = 0 is the subnormal 2**-127), 0xFF -> NaN.
struct E8M0Table {
  float value[256];
  E8M0Table() {
    for (int s = 0; s < 256; ++s) {
      const uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : static_cast<uint32_t>(s) << 23;
      std::memcpy(&value[s], &bits, sizeof(float));
    }
  }
};
const E8M0Table kE8M0;

inline float e8m0(uint8_t s) { return kE8M0.value[s]; }

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Weights are streamed start to end on every call: 2 MB pages spare a page walk and a restart of the
// hardware prefetcher (which stops at 4 KB boundaries) every 4 KB. Only a hint: without transparent huge
// pages (or off Linux) nothing changes.
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// Checkpoint layout (rows, K/32, 16) + (rows, K/32) -> packed (rows, Kp/128, 64) + (rows, Kp/32).
std::tuple<at::Tensor, at::Tensor> mxfp4_prepack(const at::Tensor& blocks, const at::Tensor& scales) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte,
              "mxfp4_prepack: blocks and scales must be uint8");
  TORCH_CHECK(blocks.dim() >= 3 && blocks.size(-1) == kBlockBytes && scales.dim() == blocks.dim() - 1,
              "mxfp4_prepack: expected blocks (..., rows, K/32, 16) and scales (..., rows, K/32)");
  for (int64_t d = 0; d < scales.dim(); ++d)
    TORCH_CHECK(scales.size(d) == blocks.size(d), "mxfp4_prepack: blocks ", blocks.sizes(), " and scales ",
                scales.sizes(), " do not match");
  const int64_t groups = blocks.size(-2), rows = blocks.numel() / (groups * kBlockBytes);
  const int64_t supers = (groups + kSuperBlocks - 1) / kSuperBlocks, gp = supers * kSuperBlocks;
  auto packed_shape = blocks.sizes().vec();
  packed_shape[packed_shape.size() - 2] = supers;
  packed_shape.back() = kSuperBytes;
  auto scale_shape = scales.sizes().vec();
  scale_shape.back() = gp;
  auto packed = at::empty(packed_shape, blocks.options());
  advise_huge_pages(packed.data_ptr(), packed.nbytes());  // before the first touch below
  std::memset(packed.data_ptr(), 0, packed.nbytes());
  auto packed_scales = at::full(scale_shape, kPadScale, scales.options());
  const auto b = blocks.contiguous(), s = scales.contiguous();
  const uint8_t* src = b.data_ptr<uint8_t>();
  const uint8_t* ssrc = s.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  uint8_t* sdst = packed_scales.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* in = src + r * groups * kBlockBytes;
      uint8_t* out = dst + r * supers * kSuperBytes;
      for (int64_t g = 0; g < groups; ++g)
        for (int j = 0; j < kBlockBytes; ++j)
          for (int half = 0; half < 2; ++half) {  // element 2j (low nibble), 2j + 1 (high)
            const int64_t e = g * kBlock + 2 * j + half;
            const uint8_t code = (in[g * kBlockBytes + j] >> (4 * half)) & 0x0F;
            const int64_t w = e % kSuper;
            out[(e / kSuper) * kSuperBytes + w % 64] |= static_cast<uint8_t>(code << (w < 64 ? 0 : 4));
          }
      std::memcpy(sdst + r * gp, ssrc + r * groups, groups);
    }
  });
  return {packed, packed_scales};
}

// One projection for a group of tokens: out[t][r] = sum_k w[r][k] * act[t][k] + bias[r], for rows
// [row_begin, row_end). K is padded to whole superblocks; activations are zero past the real K.
struct Projection {
  const uint8_t* blocks;  // (rows, K/128, 64) packed
  const uint8_t* scales;  // (rows, K/32)
  const float* bias;      // (rows)
  int64_t k;              // padded contraction length
  const void* act;        // (n, K): fp32 (portable/AVX2), bf16 (AVX-512 GEMM) or int8 (AVX-512 VNNI)
  const float* act_scale;      // VNNI: (n, K/64, 16) per-lane block scales (x 0.5, the codes' factor)
  const int32_t* act_offset;   // VNNI: (n, K/64, 16) -12 * sum of each block's int8 codes, in its first lane
  int64_t n;              // tokens
  float* out;             // (n, rows)
  int64_t rows;
  bool gemm;              // decode tiles + ATen GEMM (many tokens) instead of the register kernel
};

// ------------------------------------------------------------------------------------------ portable
void decode_rows_f32_portable(const Projection& p, int64_t r0, int64_t nr, float* scratch) {
  const int64_t supers = p.k / kSuper, groups = p.k / kBlock;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * supers * kSuperBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    float* dst = scratch + r * p.k;
    for (int64_t sb = 0; sb < supers; ++sb)
      for (int j = 0; j < 64; ++j) {
        const uint8_t byte = b[sb * kSuperBytes + j];
        dst[sb * kSuper + j] = kFp4[byte & 0x0F] * e8m0(s[sb * kSuperBlocks + j / kBlock]);
        dst[sb * kSuper + 64 + j] = kFp4[byte >> 4] * e8m0(s[sb * kSuperBlocks + 2 + j / kBlock]);
      }
  }
}

float dot_portable(const float* w, const float* x, int64_t k) {
  float acc = 0.0f;
  for (int64_t i = 0; i < k; ++i) acc += w[i] * x[i];
  return acc;
}

using DecodeF32 = void (*)(const Projection&, int64_t, int64_t, float*);
using DotF32 = float (*)(const float*, const float*, int64_t);

// fp32 paths: decode a row-group into an L1-sized scratch, then one dot product per (token, row).
void project_f32(const Projection& p, int64_t row_begin, int64_t row_end, DecodeF32 decode, DotF32 dot) {
  std::vector<float> scratch(kRows * p.k);
  const float* act = static_cast<const float*>(p.act);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, row_end - r0);
    decode(p, r0, nr, scratch.data());
    for (int64_t t = 0; t < p.n; ++t)
      for (int64_t r = 0; r < nr; ++r)
        p.out[t * p.rows + r0 + r] = dot(scratch.data() + r * p.k, act + t * p.k, p.k) + p.bias[r0 + r];
  }
}

#ifdef GPTOSS_X86
// ---------------------------------------------------------------------------------------------- AVX2
__attribute__((target("avx2,fma"))) void decode_rows_f32_avx2(const Projection& p, int64_t r0, int64_t nr,
                                                              float* scratch) {
  const int64_t supers = p.k / kSuper, groups = p.k / kBlock;
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i low3 = _mm256_set1_epi32(7);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * supers * kSuperBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    float* dst = scratch + r * p.k;
    for (int64_t sb = 0; sb < supers; ++sb)
      for (int q = 0; q < 8; ++q) {  // bytes 8q..8q+7: elements 8q.. (low nibbles) and 64 + 8q.. (high)
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + sb * kSuperBytes + 8 * q));
        const __m256i v = _mm256_cvtepu8_epi32(bytes);
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
        const __m256i hi = _mm256_srli_epi32(v, 4);
        // Magnitude from the low 3 bits, sign from bit 3 moved to the float sign bit.
        __m256 wl = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(lo, low3));
        __m256 wh = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(hi, low3));
        wl = _mm256_xor_ps(wl, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(lo, 3), 31)));
        wh = _mm256_xor_ps(wh, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(hi, 3), 31)));
        const int block = q / 4;  // 8q / 32
        _mm256_storeu_ps(dst + sb * kSuper + 8 * q, _mm256_mul_ps(wl, _mm256_set1_ps(e8m0(s[sb * kSuperBlocks + block]))));
        _mm256_storeu_ps(dst + sb * kSuper + 64 + 8 * q,
                         _mm256_mul_ps(wh, _mm256_set1_ps(e8m0(s[sb * kSuperBlocks + 2 + block]))));
      }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* w, const float* x, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {  // k is a multiple of 128
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  return hsum256(_mm256_add_ps(a0, a1));
}

// ------------------------------------------------------------------------------------------- AVX-512
// Small batches (up to 23 tokens per expert): int8 dot products (vpdpbusd). A code c becomes the unsigned byte 2 * E2M1(c) + 12
// (0..24, one vpshufb); activations are quantised per 32-element block to int8 with an fp32 scale. Each
// vpdpbusd starts from a vector holding -12 * (sum of the block's int8 activations) in the block's first
// lane, which removes the +12 offset, so lanes 0-7 sum to 2 * dot(block A) and lanes 8-15 to 2 * dot(block B);
// one FMA with (weight scale x activation scale / 2) per lane finishes both blocks.
// Large batches: tiles decoded to bf16 for ATen's GEMM (oneDNN: AMX or AVX-512 BF16 where present).
#define GPTOSS_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni"

// Decode rows into bf16 in natural order, scales applied (for the GEMM path).
__attribute__((target(GPTOSS_AVX512))) void decode_rows_bf16_avx512(const Projection& p, int64_t r0, int64_t nr,
                                                                     uint16_t* dst) {
  const int64_t supers = p.k / kSuper, groups = p.k / kBlock;
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * supers * kSuperBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    for (int64_t sb = 0; sb < supers; ++sb)
      for (int half = 0; half < 2; ++half) {  // bytes 32*half..: block `half` (low nibbles), block 2+half (high)
        const uint8_t* bytes = b + sb * kSuperBytes + 32 * half;
        const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
        const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
        const __m512 slo = _mm512_set1_ps(e8m0(s[sb * kSuperBlocks + half]));
        const __m512 shi = _mm512_set1_ps(e8m0(s[sb * kSuperBlocks + 2 + half]));
        const __m512 lo0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v0, nibble), lut), slo);
        const __m512 lo1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v1, nibble), lut), slo);
        const __m512 hi0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), lut), shi);
        const __m512 hi1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), lut), shi);
        uint16_t* o = dst + r * p.k + sb * kSuper + 32 * half;
        // cvtne2ps puts its second operand in the low half.
        _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(lo1, lo0));
        _mm512_storeu_si512(o + 64, (__m512i)_mm512_cvtne2ps_pbh(hi1, hi0));
      }
  }
}

// Quantise fp32 rows (real length k_real, zero-padded to p.k) for the VNNI kernel.
__attribute__((target(GPTOSS_AVX512))) void quantise_rows_avx512(const float* const* src, int64_t n, int64_t k_real,
                                                                  int64_t k, int8_t* q, float* lane_scale,
                                                                  int32_t* lane_offset) {
  const int64_t pairs = k / 64;
  std::memset(lane_offset, 0, sizeof(int32_t) * n * pairs * 16);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < k / kBlock; ++g) {
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
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + t * k + e0), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + t * k + e0 + 16), _mm512_cvtsepi32_epi8(qb));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      const float scale = finite ? amax / 127.0f * 0.5f : NAN;
      const int64_t lane = (t * pairs + g / 2) * 16 + (g % 2) * 8;
      for (int i = 0; i < 8; ++i) lane_scale[lane + i] = scale;
      lane_offset[lane] = -12 * sum;
    }
}

// Scales of a superblock's 4 blocks as two lane vectors: [s0 x8 | s1 x8] and [s2 x8 | s3 x8].
__attribute__((target(GPTOSS_AVX512))) inline void superblock_scales(const uint8_t* s, __m512& s01, __m512& s23) {
  uint32_t word;
  std::memcpy(&word, s, sizeof(word));
  const __m512i bytes = _mm512_set1_epi32(static_cast<int32_t>(word));
  const __m512i e01 = _mm512_shuffle_epi8(bytes, _mm512_setr_epi32(
      -256, -256, -256, -256, -256, -256, -256, -256, -255, -255, -255, -255, -255, -255, -255, -255));
  const __m512i e23 = _mm512_shuffle_epi8(bytes, _mm512_setr_epi32(
      -254, -254, -254, -254, -254, -254, -254, -254, -253, -253, -253, -253, -253, -253, -253, -253));
  s01 = _mm512_castsi512_ps(_mm512_slli_epi32(e01, 23));
  s23 = _mm512_castsi512_ps(_mm512_slli_epi32(e23, 23));
  // 0xFF is NaN in E8M0 (the shift made it +inf); 0 flushes 2**-127 to zero.
  if (__builtin_expect(((~word - 0x01010101u) & word & 0x80808080u) != 0, 0)) {  // some byte is 0xFF
    const __m512i ff = _mm512_set1_epi32(255);
    s01 = _mm512_mask_mov_ps(s01, _mm512_cmpeq_epi32_mask(e01, ff), _mm512_set1_ps(NAN));
    s23 = _mm512_mask_mov_ps(s23, _mm512_cmpeq_epi32_mask(e23, ff), _mm512_set1_ps(NAN));
  }
}

template <int T, int R>
__attribute__((target(GPTOSS_AVX512))) void project_vnni_t(const Projection& p, int64_t row_begin,
                                                            int64_t row_end) {
  const int64_t supers = p.k / kSuper, groups = p.k / kBlock, pairs = p.k / 64;
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int8_t* q = static_cast<const int8_t*>(p.act);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += R) {
    const int64_t nr = std::min<int64_t>(R, row_end - r0);
    const uint8_t* blk[R];
    const uint8_t* scl[R];
    for (int r = 0; r < R; ++r) {  // missing rows repeat the first one and are not stored
      const int64_t row = r0 + (r < nr ? r : 0);
      blk[r] = p.blocks + row * supers * kSuperBytes;
      scl[r] = p.scales + row * groups;
    }
    for (int64_t t0 = 0; t0 < p.n; t0 += T) {
      const int64_t nt = std::min<int64_t>(T, p.n - t0);
      int64_t tok[T];
      for (int t = 0; t < T; ++t) tok[t] = t0 + (t < nt ? t : 0);
      __m512 acc[T][R];
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < supers; ++sb) {
        __m512i lo[R], hi[R];
        __m512 s01[R], s23[R];
        for (int r = 0; r < R; ++r) {
          // Rows are short streams (1.5 KB for gpt-oss): fetch ahead instead of waiting on the prefetcher.
          _mm_prefetch(reinterpret_cast<const char*>(blk[r] + sb * kSuperBytes + kPrefetchBytes), _MM_HINT_T2);
          const __m512i v = _mm512_loadu_si512(blk[r] + sb * kSuperBytes);
          lo[r] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibble));
          hi[r] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
          superblock_scales(scl[r] + sb * kSuperBlocks, s01[r], s23[r]);
        }
        for (int t = 0; t < T; ++t) {
          const int8_t* x = q + tok[t] * p.k + sb * kSuper;
          const int64_t lane = (tok[t] * pairs + 2 * sb) * 16;
          const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);
          const __m512i o0 = _mm512_loadu_si512(p.act_offset + lane), o1 = _mm512_loadu_si512(p.act_offset + lane + 16);
          const __m512 a0 = _mm512_loadu_ps(p.act_scale + lane), a1 = _mm512_loadu_ps(p.act_scale + lane + 16);
          for (int r = 0; r < R; ++r) {
            const __m512 d0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(o0, lo[r], x0));
            const __m512 d1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(o1, hi[r], x1));
            acc[t][r] = _mm512_fmadd_ps(d0, _mm512_mul_ps(s01[r], a0), acc[t][r]);
            acc[t][r] = _mm512_fmadd_ps(d1, _mm512_mul_ps(s23[r], a1), acc[t][r]);
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t r = 0; r < nr; ++r)
          p.out[(t0 + t) * p.rows + r0 + r] = _mm512_reduce_add_ps(acc[t][r]) + p.bias[r0 + r];
    }
  }
}

// Rows decoded together (R) keep more loads in flight; tokens (T) share each decode. T * R accumulators
// and R decoded rows with their scales must fit the 32 vector registers.
void project_avx512(const Projection& p, int64_t row_begin, int64_t row_end) {
  if (p.n == 1) return project_vnni_t<1, 4>(p, row_begin, row_end);
  if (p.n == 2) return project_vnni_t<2, 2>(p, row_begin, row_end);
  return project_vnni_t<4, 2>(p, row_begin, row_end);
}
#endif  // GPTOSS_X86

DecodeF32 f32_decoder(Isa isa) {
#ifdef GPTOSS_X86
  if (isa == kAvx2) return decode_rows_f32_avx2;
#endif
  return decode_rows_f32_portable;
}

// Many tokens: decode a tile of rows (L2-sized) and multiply with ATen's GEMM (oneDNN/MKL: AMX or
// AVX-512 BF16 where present). Still reads only MXFP4 from memory; the decoded tile is reused by every token.
void project_gemm(const Projection& p, Isa isa) {
  const bool bf16 = isa == kAvx512;
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  const auto act = at::from_blob(const_cast<void*>(p.act), {p.n, p.k}, at::TensorOptions().dtype(dtype));
  const int64_t tiles = (p.rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    auto tile = at::empty({kTileRows, p.k}, at::TensorOptions().dtype(dtype));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTileRows, nr = std::min<int64_t>(kTileRows, p.rows - r0);
#ifdef GPTOSS_X86
      if (isa == kAvx512)
        decode_rows_bf16_avx512(p, r0, nr, static_cast<uint16_t*>(tile.data_ptr()));
      else
#endif
        f32_decoder(isa)(p, r0, nr, tile.data_ptr<float>());
      // Weights as the left operand: AMX and the BF16 kernels read it row-major as it is, and only the small
      // activation matrix is repacked (the other way round oneDNN repacked the whole tile on every call).
      const auto h = at::mm(tile.narrow(0, 0, nr), act.t()).to(at::kFloat).t().contiguous();  // (n, nr)
      const float* hp = h.data_ptr<float>();
      for (int64_t i = 0; i < p.n; ++i)
        for (int64_t r = 0; r < nr; ++r) p.out[i * p.rows + r0 + r] = hp[i * nr + r] + p.bias[r0 + r];
    }
  });
}

void project(const Projection& p, Isa isa) {
  if (p.gemm) return project_gemm(p, isa);
  // Split rows over threads in whole row-groups; ATen's pool honours torch.get_num_threads().
  const int64_t groups = (p.rows + kRows - 1) / kRows;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * kRows, r1 = std::min(p.rows, g1 * kRows);
#ifdef GPTOSS_X86
    if (isa == kAvx512) return project_avx512(p, r0, r1);
    if (isa == kAvx2) return project_f32(p, r0, r1, decode_rows_f32_avx2, dot_avx2);
#endif
    project_f32(p, r0, r1, decode_rows_f32_portable, dot_portable);
  });
}

// The activations of one projection, in the form its path reads: fp32 or bf16 rows zero-padded to the
// packed K, or (VNNI) int8 codes with per-lane block scales and offsets.
struct Activations {
  at::Tensor values, scale, offset;

  Activations(const float* const* rows, int64_t n, int64_t k_real, int64_t k, Isa isa, bool gemm) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
#ifdef GPTOSS_X86
    if (isa == kAvx512 && !gemm) {
      values = at::empty({n, k}, at::TensorOptions().dtype(at::kChar));
      scale = at::empty({n, k / 64, 16}, f32);
      offset = at::empty({n, k / 64, 16}, at::TensorOptions().dtype(at::kInt));
      quantise_rows_avx512(rows, n, k_real, k, values.data_ptr<int8_t>(), scale.data_ptr<float>(),
                           offset.data_ptr<int32_t>());
      return;
    }
#endif
    const bool bf16 = isa == kAvx512;
    values = at::zeros({n, k}, f32.dtype(bf16 ? at::kBFloat16 : at::kFloat));
    at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        if (bf16) {
          at::BFloat16* d = values.data_ptr<at::BFloat16>() + t * k;
          for (int64_t j = 0; j < k_real; ++j) d[j] = at::BFloat16(rows[t][j]);
        } else {
          std::memcpy(values.data_ptr<float>() + t * k, rows[t], sizeof(float) * k_real);
        }
      }
    });
  }

  const float* lane_scale() const { return scale.defined() ? scale.data_ptr<float>() : nullptr; }
  const int32_t* lane_offset() const { return offset.defined() ? offset.data_ptr<int32_t>() : nullptr; }
};

int64_t best_isa() {
#ifdef GPTOSS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

at::Tensor mxfp4_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                     const at::Tensor& w13_blocks, const at::Tensor& w13_scales, const at::Tensor& w13_bias,
                     const at::Tensor& w2_blocks, const at::Tensor& w2_scales, const at::Tensor& w2_bias,
                     double alpha, double limit, int64_t isa_request, int64_t gemm_min_tokens) {
  TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0), "mxfp4_moe: bad x/topk shapes");
  TORCH_CHECK(w13_blocks.scalar_type() == at::kByte && w2_blocks.scalar_type() == at::kByte, "blocks must be uint8");
  TORCH_CHECK(w13_blocks.dim() == 4 && w13_blocks.size(3) == kSuperBytes && w2_blocks.dim() == 4 &&
                  w2_blocks.size(3) == kSuperBytes,
              "mxfp4_moe: weights must be pre-packed (mxfp4_prepack): (E, rows, K/128, 64) blocks");
  const int64_t num_tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t experts = w13_blocks.size(0), inter2 = w13_blocks.size(1), inter = inter2 / 2;
  TORCH_CHECK(hidden % kBlock == 0 && inter % kBlock == 0, "mxfp4_moe: hidden and intermediate must be multiples of 32");
  const int64_t kp13 = padded(hidden), kp2 = padded(inter);
  TORCH_CHECK(w13_blocks.size(2) * kSuper == kp13 && w13_scales.size(2) * kBlock == kp13 &&
                  w2_blocks.size(1) == hidden && w2_blocks.size(2) * kSuper == kp2 && w2_scales.size(2) * kBlock == kp2,
              "mxfp4_moe: packed weight shapes do not match hidden ", hidden, " / intermediate ", inter);
  const int64_t best = best_isa();
  const Isa isa = static_cast<Isa>(isa_request < 0 ? best : std::min(isa_request, best));

  const auto xf = x.to(at::kFloat).contiguous();
  const auto ids = topk_ids.to(at::kLong).contiguous();
  const auto tw = topk_weights.to(at::kFloat).contiguous();
  const auto b13 = w13_bias.to(at::kFloat).contiguous(), b2 = w2_bias.to(at::kFloat).contiguous();
  const auto blk13 = w13_blocks.contiguous(), sc13 = w13_scales.contiguous();
  const auto blk2 = w2_blocks.contiguous(), sc2 = w2_scales.contiguous();
  auto out = at::zeros({num_tokens, hidden}, x.options().dtype(at::kFloat));

  // Group (token, slot) pairs by expert: a counting sort keeps token order within each expert.
  std::vector<int64_t> count(experts + 1, 0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens * top_k; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < experts, "mxfp4_moe: expert id ", id[i], " out of range");
    ++count[id[i] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) count[e + 1] += count[e];
  std::vector<int64_t> order(num_tokens * top_k), fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < num_tokens * top_k; ++i) order[fill[id[i]]++] = i;

  const int64_t gemm_min = gemm_min_tokens <= 0 ? INT64_MAX : gemm_min_tokens;
  const float* xp = xf.data_ptr<float>();
  const float* wp = tw.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const float a = static_cast<float>(alpha), lim = static_cast<float>(limit);

  // One expert's MLP for its n tokens: y (n, hidden), row t for the pair pairs[t].
  auto run_expert = [&](int64_t e, float* y) {
    const int64_t n = count[e + 1] - count[e];
    const int64_t* pairs = order.data() + count[e];
    const bool gemm = n >= gemm_min;
    std::vector<const float*> rows(n);
    for (int64_t t = 0; t < n; ++t) rows[t] = xp + (pairs[t] / top_k) * hidden;
    const Activations xa(rows.data(), n, hidden, kp13, isa, gemm);
    auto h = at::empty({n, inter2}, xf.options());
    project({blk13.data_ptr<uint8_t>() + e * inter2 * kp13 / 2, sc13.data_ptr<uint8_t>() + e * inter2 * kp13 / kBlock,
             b13.data_ptr<float>() + e * inter2, kp13, xa.values.data_ptr(), xa.lane_scale(), xa.lane_offset(), n,
             h.data_ptr<float>(), inter2, gemm},
            isa);
    // gpt-oss SwiGLU on interleaved (gate, linear) pairs.
    auto act = at::empty({n, inter}, xf.options());
    float* hp = h.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    at::parallel_for(0, n * inter, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float g = std::min(hp[2 * i], lim);
        const float l = std::max(std::min(hp[2 * i + 1], lim), -lim);
        ap[i] = g / (1.0f + std::exp(-a * g)) * (l + 1.0f);
      }
    });
    for (int64_t t = 0; t < n; ++t) rows[t] = ap + t * inter;
    const Activations aa(rows.data(), n, inter, kp2, isa, gemm);
    project({blk2.data_ptr<uint8_t>() + e * hidden * kp2 / 2, sc2.data_ptr<uint8_t>() + e * hidden * kp2 / kBlock,
             b2.data_ptr<float>() + e * hidden, kp2, aa.values.data_ptr(), aa.lane_scale(), aa.lane_offset(), n, y,
             hidden, gemm},
            isa);
  };

  std::vector<int64_t> active;
  int64_t most = 0;
  for (int64_t e = 0; e < experts; ++e)
    if (count[e + 1] > count[e]) {
      active.push_back(e);
      most = std::max(most, count[e + 1] - count[e]);
    }
  // Every (token, slot) pair's expert output, rows grouped by expert as `order` lists them.
  auto y = at::empty({num_tokens * top_k, hidden}, xf.options());
  float* yp = y.data_ptr<float>();
  if (most < gemm_min && static_cast<int64_t>(active.size()) >= at::get_num_threads()) {
    // Small batches: each thread takes whole experts, so it streams each expert's weights start to end with
    // no barrier in between (projections called inside the parallel region run on the calling thread).
    at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run_expert(active[i], yp + count[active[i]] * hidden);
    });
  } else {
    // Larger batches: experts one after another, each projection split over the threads.
    for (const int64_t e : active) run_expert(e, yp + count[e] * hidden);
  }
  // Routing-weighted sum over each token's experts in expert order (whatever the schedule or the batch).
  std::vector<int64_t> row_of(num_tokens * top_k);
  for (int64_t i = 0; i < num_tokens * top_k; ++i) row_of[order[i]] = i;
  at::parallel_for(0, num_tokens, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> rows(top_k);
    for (int64_t token = t0; token < t1; ++token) {
      for (int64_t slot = 0; slot < top_k; ++slot) rows[slot] = row_of[token * top_k + slot];
      std::sort(rows.begin(), rows.end());
      for (const int64_t row : rows) {
        const float w = wp[order[row]];
        const float* yr = yp + row * hidden;
        for (int64_t j = 0; j < hidden; ++j) outp[token * hidden + j] += w * yr[j];
      }
    }
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(gptoss_vllm_cpu, m) {
  m.def(
      "mxfp4_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_blocks, Tensor w13_scales, "
      "Tensor w13_bias, Tensor w2_blocks, Tensor w2_scales, Tensor w2_bias, float alpha, float limit, "
      "int isa, int gemm_min_tokens) -> Tensor");
  m.def("mxfp4_prepack(Tensor blocks, Tensor scales) -> (Tensor, Tensor)");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(gptoss_vllm_cpu, CPU, m) {
  m.impl("mxfp4_moe", &mxfp4_moe);
  m.impl("mxfp4_prepack", &mxfp4_prepack);
}
