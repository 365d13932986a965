// Fused MXFP4 MoE for CPUs: the gpt-oss expert MLP computed straight from MXFP4 weights.
//
// Per expert, for the tokens routed to it: h = x W13^T + b13, the gpt-oss SwiGLU variant,
// y = act W2^T + b2, then out[token] += routing_weight * y.
//
// Weights are pre-packed once at load time (mxfp4_prepack), still 4.25 bits per weight. Rows are padded
// with zero blocks to whole superblocks of 4 MXFP4 blocks (128 elements) and taken 4 at a time (a row
// group). One step of the kernel is one superblock of one row group: 256 bytes of codes and 16 bytes of
// E8M0 scales (row r's block j at byte 4r + j), each step right after the previous one, so that a thread's
// rows are two sequential streams the hardware prefetcher follows.
//
// Within a superblock the contraction runs in "kernel order", not element order: position
// p = 16 i + 4 j + b holds element e = 32 j + 4 i + b (block j, 4-element chunk i, b < 4). Activations are
// put in the same order (kernel_position), which leaves every dot product unchanged. In that order a
// step's 256 code bytes are 4 vectors of 64 bytes; byte 16 r + 4 j + b of vector L holds row r's position
// 32 L + 4 j + b in its low nibble and position 32 L + 16 + 4 j + b in its high one. So one 64-byte load,
// a mask, a shift and a table lookup give two vectors whose 32-bit lane 4 r + j multiplies row r's block j
// with 16 bytes of activations broadcast to all 4 rows, and the lane keeps that (row, block) for the whole
// superblock: 8 int8 dot products accumulate into one vector, which is converted and scaled once, by a
// vector of the step's 16 scales as they lie in memory. That is a third of the instructions the per-row
// layout needed at batch 1, where the kernel was bound by instructions and not by DRAM.
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
constexpr int kSuper = 128;        // elements per superblock (4 blocks)
constexpr int kSuperBlocks = kSuper / kBlock;
constexpr int kGroupRows = 4;      // rows per row group
constexpr int kStepBytes = kGroupRows * kSuper / 2;        // code bytes per step (a superblock of a row group)
constexpr int kStepScales = kGroupRows * kSuperBlocks;     // scale bytes per step
constexpr int kChunkBytes = 64;    // a step's codes are 4 such vectors
constexpr uint8_t kPadScale = 127;  // scale of padding blocks (1.0; their codes are zero)
constexpr int kPrefetchBytes = 8192;  // software prefetch distance on the code stream, into L2 (past page ends)
constexpr int kTileRows = 512;     // rows decoded per GEMM tile: oneDNN repacks every tile, so few large calls
// From this many tokens per expert the kernel decodes tiles and uses ATen's GEMM; the caller passes it
// (GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS, default 24: the measured crossover). <= 0 turns the GEMM path off, which
// makes every token's result independent of how many other tokens share its expert (batch invariance).

inline int64_t padded(int64_t k) { return (k + kSuper - 1) / kSuper * kSuper; }

// Where element e of a (padded) row sits in kernel order: p = 16 i + 4 j + b for e = 32 j + 4 i + b.
inline int64_t kernel_position(int64_t e) {
  const int64_t w = e % kSuper;
  return e - w + (w % kBlock) / 4 * 16 + w / kBlock * 4 + w % 4;
}

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

// Checkpoint layout (rows, K/32, 16) + (rows, K/32) -> packed codes (rows/4, Kp/128, 4, 64) and scales
// (rows/4, Kp/128, 4, 4): see the top of this file.
std::tuple<at::Tensor, at::Tensor> mxfp4_prepack(const at::Tensor& blocks, const at::Tensor& scales) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte,
              "mxfp4_prepack: blocks and scales must be uint8");
  TORCH_CHECK(blocks.dim() >= 3 && blocks.size(-1) == kBlockBytes && scales.dim() == blocks.dim() - 1,
              "mxfp4_prepack: expected blocks (..., rows, K/32, 16) and scales (..., rows, K/32)");
  for (int64_t d = 0; d < scales.dim(); ++d)
    TORCH_CHECK(scales.size(d) == blocks.size(d), "mxfp4_prepack: blocks ", blocks.sizes(), " and scales ",
                scales.sizes(), " do not match");
  TORCH_CHECK(blocks.size(-3) % kGroupRows == 0, "mxfp4_prepack: rows (", blocks.size(-3),
              ") must be a multiple of ", kGroupRows);
  const int64_t groups = blocks.size(-2), rows = blocks.numel() / (groups * kBlockBytes);
  const int64_t supers = (groups + kSuperBlocks - 1) / kSuperBlocks;
  auto packed_shape = blocks.sizes().vec();
  packed_shape.resize(packed_shape.size() - 3);
  packed_shape.insert(packed_shape.end(), {blocks.size(-3) / kGroupRows, supers, kStepBytes / kChunkBytes, kChunkBytes});
  auto scale_shape = packed_shape;
  scale_shape[scale_shape.size() - 2] = kGroupRows;
  scale_shape.back() = kSuperBlocks;
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
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t r = row % kGroupRows, first_step = row / kGroupRows * supers;
      const uint8_t* in = src + row * groups * kBlockBytes;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t step = first_step + g / kSuperBlocks;
        for (int64_t e = g * kBlock; e < (g + 1) * kBlock; ++e) {
          const uint8_t code = (in[e / 2] >> (4 * (e % 2))) & 0x0F;  // even elements in the low nibble
          const int64_t pos = kernel_position(e) % kSuper;          // 32 L + 16 h + (4 j + b)
          const int64_t chunk = pos / 32, high = pos / 16 % 2;
          dst[step * kStepBytes + chunk * kChunkBytes + 16 * r + pos % 16] |= static_cast<uint8_t>(code << (4 * high));
        }
        sdst[step * kStepScales + 4 * r + g % kSuperBlocks] = ssrc[row * groups + g];
      }
    }
  });
  return {packed, packed_scales};
}

// One projection for a group of tokens: out[t][r] = sum_k w[r][k] * act[t][k] + bias[r], for rows
// [row_begin, row_end), whole row groups. K is padded to whole superblocks; activations are zero past the
// real K and in kernel order.
struct Projection {
  const uint8_t* blocks;  // (rows/4, K/128, 4, 64) packed codes
  const uint8_t* scales;  // (rows/4, K/128, 4, 4)
  const float* bias;      // (rows)
  int64_t k;              // padded contraction length
  const void* act;        // (n, K): fp32 (portable/AVX2), bf16 (AVX-512 GEMM) or int8 (AVX-512 VNNI)
  const float* act_scale;     // VNNI: (n, K/32) each block's scale (x 0.5, the codes' factor)
  const int32_t* act_offset;  // VNNI: (n, K/32) -12 * sum of each block's int8 codes
  int64_t n;              // tokens
  float* out;             // (n, rows)
  int64_t rows;
  bool gemm;              // decode tiles + ATen GEMM (many tokens) instead of the register kernel

  int64_t supers() const { return k / kSuper; }
  const uint8_t* step_codes(int64_t group, int64_t sb) const { return blocks + (group * supers() + sb) * kStepBytes; }
  const uint8_t* step_scales(int64_t group, int64_t sb) const { return scales + (group * supers() + sb) * kStepScales; }
};

// ------------------------------------------------------------------------------------------ portable
// Decode rows [r0, r0 + nr) (whole row groups) to fp32, in kernel order, scales applied.
void decode_rows_f32_portable(const Projection& p, int64_t r0, int64_t nr, float* scratch) {
  for (int64_t row = r0; row < r0 + nr; ++row) {
    const int64_t group = row / kGroupRows, r = row % kGroupRows;
    float* dst = scratch + (row - r0) * p.k;
    for (int64_t sb = 0; sb < p.supers(); ++sb) {
      const uint8_t* c = p.step_codes(group, sb) + 16 * r;
      const uint8_t* s = p.step_scales(group, sb) + 4 * r;
      for (int chunk = 0; chunk < kStepBytes / kChunkBytes; ++chunk)
        for (int i = 0; i < 16; ++i) {  // byte 4j + b: positions 32 chunk + i (low nibble) and + 16 (high)
          const uint8_t byte = c[chunk * kChunkBytes + i];
          const float scale = e8m0(s[i / 4]);
          dst[sb * kSuper + 32 * chunk + i] = kFp4[byte & 0x0F] * scale;
          dst[sb * kSuper + 32 * chunk + 16 + i] = kFp4[byte >> 4] * scale;
        }
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

// fp32 paths: decode a row group into an L1-sized scratch, then one dot product per (token, row).
void project_f32(const Projection& p, int64_t row_begin, int64_t row_end, DecodeF32 decode, DotF32 dot) {
  std::vector<float> scratch(kGroupRows * p.k);
  const float* act = static_cast<const float*>(p.act);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kGroupRows) {
    decode(p, r0, kGroupRows, scratch.data());
    for (int64_t t = 0; t < p.n; ++t)
      for (int64_t r = 0; r < kGroupRows; ++r)
        p.out[t * p.rows + r0 + r] = dot(scratch.data() + r * p.k, act + t * p.k, p.k) + p.bias[r0 + r];
  }
}

#ifdef GPTOSS_X86
// ---------------------------------------------------------------------------------------------- AVX2
__attribute__((target("avx2,fma"))) void decode_rows_f32_avx2(const Projection& p, int64_t r0, int64_t nr,
                                                              float* scratch) {
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i low3 = _mm256_set1_epi32(7);
  for (int64_t row = r0; row < r0 + nr; ++row) {
    const int64_t group = row / kGroupRows, r = row % kGroupRows;
    float* dst = scratch + (row - r0) * p.k;
    for (int64_t sb = 0; sb < p.supers(); ++sb) {
      const uint8_t* c = p.step_codes(group, sb) + 16 * r;
      const uint8_t* s = p.step_scales(group, sb) + 4 * r;
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
          float* o = dst + sb * kSuper + 32 * chunk + 8 * half;
          _mm256_storeu_ps(o, _mm256_mul_ps(wl, scale));
          _mm256_storeu_ps(o + 16, _mm256_mul_ps(wh, scale));
        }
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
// Small batches (up to 23 tokens per expert): int8 dot products (vpdpbusd). A code c becomes the unsigned
// byte 2 * E2M1(c) + 12 (0..24, one vpshufb); activations are quantised per 32-element block to int8 with
// an fp32 scale. Each superblock's dot products start from -12 * (sum of the block's int8 activations),
// which removes the +12 offset, and give 2 * dot per (row, block) lane; the block scales carry the 1/2.
// Large batches: tiles decoded to bf16 for ATen's GEMM (oneDNN: AMX or AVX-512 BF16 where present).
#define GPTOSS_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni"

// 16 E8M0 bytes as 16 fp32 lanes: 2**(s - 127) from the exponent bits (0 flushes 2**-127 to zero), 0xFF NaN.
__attribute__((target(GPTOSS_AVX512))) inline __m512 e8m0_lanes(__m128i bytes) {
  const __m512i e = _mm512_cvtepu8_epi32(bytes);
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255));  // the shift made it +inf
  return __builtin_expect(nan != 0, 0) ? _mm512_mask_mov_ps(f, nan, _mm512_set1_ps(NAN)) : f;
}

// Decode rows into bf16 in kernel order, scales applied (for the GEMM path).
__attribute__((target(GPTOSS_AVX512))) void decode_rows_bf16_avx512(const Projection& p, int64_t r0, int64_t nr,
                                                                     uint16_t* dst) {
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  const __m128i by_block = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t row = r0; row < r0 + nr; ++row) {
    const int64_t group = row / kGroupRows, r = row % kGroupRows;
    for (int64_t sb = 0; sb < p.supers(); ++sb) {
      const uint8_t* c = p.step_codes(group, sb) + 16 * r;
      int32_t word;
      std::memcpy(&word, p.step_scales(group, sb) + 4 * r, sizeof(word));
      const __m512 scale = e8m0_lanes(_mm_shuffle_epi8(_mm_cvtsi32_si128(word), by_block));  // lane 4j + b: block j
      for (int chunk = 0; chunk < kStepBytes / kChunkBytes; ++chunk) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + chunk * kChunkBytes)));
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, nibble), lut), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), scale);
        // cvtne2ps puts its second operand in the low half: positions 32 chunk.. (low nibbles), then + 16.
        _mm512_storeu_si512(dst + (row - r0) * p.k + sb * kSuper + 32 * chunk, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

// Quantise fp32 rows (real length k_real, zero-padded to k) for the VNNI kernel: int8 codes in kernel
// order, each block's scale (x 0.5) and -12 * the sum of its codes.
__attribute__((target(GPTOSS_AVX512))) void quantise_rows_avx512(const float* const* src, int64_t n, int64_t k_real,
                                                                  int64_t k, int8_t* q, float* scale,
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

// 16 bytes repeated in each 128-bit lane: a chunk of activations (or 4 ints) for all 4 rows of a group.
__attribute__((target(GPTOSS_AVX512))) inline __m512i chunk16(const void* a) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(a)));
}

// T tokens share each decoded step: the step's 8 code vectors and T accumulators stay in registers.
template <int T>
__attribute__((target(GPTOSS_AVX512))) void project_vnni_t(const Projection& p, int64_t row_begin,
                                                            int64_t row_end) {
  const int64_t supers = p.supers(), blocks = p.k / kBlock;
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int8_t* q = static_cast<const int8_t*>(p.act);
  for (int64_t group = row_begin / kGroupRows; group < row_end / kGroupRows; ++group) {
    for (int64_t t0 = 0; t0 < p.n; t0 += T) {
      const int64_t nt = std::min<int64_t>(T, p.n - t0);
      int64_t tok[T];
      for (int t = 0; t < T; ++t) tok[t] = t0 + (t < nt ? t : 0);  // missing tokens repeat the first
      __m512 acc[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < supers; ++sb) {
        const uint8_t* c = p.step_codes(group, sb);
        __m512i w[8];  // w[i]: chunk i of kernel order, lane 4r + j = row r's block j
        for (int chunk = 0; chunk < 4; ++chunk) {
          _mm_prefetch(reinterpret_cast<const char*>(c + chunk * kChunkBytes + kPrefetchBytes), _MM_HINT_T2);
          const __m512i v = _mm512_loadu_si512(c + chunk * kChunkBytes);
          w[2 * chunk] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibble));
          w[2 * chunk + 1] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
        const __m512 wscale = e8m0_lanes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.step_scales(group, sb))));
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

void project_avx512(const Projection& p, int64_t row_begin, int64_t row_end) {
  if (p.n == 1) return project_vnni_t<1>(p, row_begin, row_end);
  if (p.n == 2) return project_vnni_t<2>(p, row_begin, row_end);
  return project_vnni_t<4>(p, row_begin, row_end);
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
  at::parallel_for(0, p.rows / kGroupRows, 1, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * kGroupRows, r1 = g1 * kGroupRows;
#ifdef GPTOSS_X86
    if (isa == kAvx512) return project_avx512(p, r0, r1);
    if (isa == kAvx2) return project_f32(p, r0, r1, decode_rows_f32_avx2, dot_avx2);
#endif
    project_f32(p, r0, r1, decode_rows_f32_portable, dot_portable);
  });
}

// The activations of one projection, in the form its path reads, in kernel order: fp32 or bf16 rows
// zero-padded to the packed K, or (VNNI) int8 codes with each block's scale and offset.
struct Activations {
  at::Tensor values, scale, offset;

  Activations(const float* const* rows, int64_t n, int64_t k_real, int64_t k, Isa isa, bool gemm) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
#ifdef GPTOSS_X86
    if (isa == kAvx512 && !gemm) {
      values = at::empty({n, k}, at::TensorOptions().dtype(at::kChar));
      scale = at::empty({n, k / kBlock}, f32);
      offset = at::empty({n, k / kBlock}, at::TensorOptions().dtype(at::kInt));
      quantise_rows_avx512(rows, n, k_real, k, values.data_ptr<int8_t>(), scale.data_ptr<float>(),
                           offset.data_ptr<int32_t>());
      return;
    }
#endif
    const bool bf16 = isa == kAvx512;
    values = at::zeros({n, k}, f32.dtype(bf16 ? at::kBFloat16 : at::kFloat));
    at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        if (bf16)
          fill(rows[t], k_real, values.data_ptr<at::BFloat16>() + t * k);
        else
          fill(rows[t], k_real, values.data_ptr<float>() + t * k);
      }
    });
  }

  // One row in kernel order: chunk i (4 elements) of each block goes 16 positions after chunk i - 1.
  template <typename T>
  static void fill(const float* src, int64_t k_real, T* dst) {
    for (int64_t e0 = 0; e0 < k_real; e0 += kBlock) {
      T* d = dst + kernel_position(e0);
      for (int i = 0; i < kBlock / 4; ++i)
        for (int b = 0; b < 4; ++b) d[16 * i + b] = T(src[e0 + 4 * i + b]);
    }
  }

  const float* block_scale() const { return scale.defined() ? scale.data_ptr<float>() : nullptr; }
  const int32_t* block_offset() const { return offset.defined() ? offset.data_ptr<int32_t>() : nullptr; }
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
  for (const auto* t : {&w13_blocks, &w13_scales, &w2_blocks, &w2_scales})
    TORCH_CHECK(t->dim() == 5 && t->size(3) == 4 &&
                    t->size(4) == (t == &w13_blocks || t == &w2_blocks ? kChunkBytes : kSuperBlocks),
                "mxfp4_moe: weights must be pre-packed (mxfp4_prepack): (E, rows/4, K/128, 4, 64) codes and "
                "(E, rows/4, K/128, 4, 4) scales");
  const int64_t num_tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t experts = w13_blocks.size(0), inter2 = w13_blocks.size(1) * kGroupRows, inter = inter2 / 2;
  TORCH_CHECK(hidden % kBlock == 0 && inter % kBlock == 0, "mxfp4_moe: hidden and intermediate must be multiples of 32");
  const int64_t kp13 = padded(hidden), kp2 = padded(inter);
  TORCH_CHECK(w13_blocks.size(2) * kSuper == kp13 && w13_scales.sizes().slice(0, 4) == w13_blocks.sizes().slice(0, 4) &&
                  w2_blocks.size(1) * kGroupRows == hidden && w2_blocks.size(2) * kSuper == kp2 &&
                  w2_scales.sizes().slice(0, 4) == w2_blocks.sizes().slice(0, 4),
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
             b13.data_ptr<float>() + e * inter2, kp13, xa.values.data_ptr(), xa.block_scale(), xa.block_offset(), n,
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
             b2.data_ptr<float>() + e * hidden, kp2, aa.values.data_ptr(), aa.block_scale(), aa.block_offset(), n, y,
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
