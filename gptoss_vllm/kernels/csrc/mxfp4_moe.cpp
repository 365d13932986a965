// Fused MXFP4 MoE for CPUs: the gpt-oss expert MLP computed straight from MXFP4 weights.
//
// Per expert, for the tokens routed to it: h = x W13^T + b13 (MXFP4 decode in registers, E8M0 scale),
// the gpt-oss SwiGLU variant, y = act W2^T + b2, then out[token] += routing_weight * y.
// Weights keep the checkpoint layout: rows of 16-byte blocks (32 E2M1 codes, even element in the low
// nibble) and one E8M0 byte per block. A row-group of weights is decoded once into a small scratch that
// stays in L1 and is reused by every token of the group; activations are laid out per block as
// [16 even | 16 odd] elements, the same order the decoder produces, so no shuffles are needed.
//
// ISA paths, chosen at run time: AVX-512 with BF16 dot products (vdpbf16ps), AVX2+FMA (fp32), and a
// portable one. All accumulate in fp32. Threads come from ATen's pool (torch.get_num_threads()).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GPTOSS_X86 1
#endif

namespace {

constexpr int kBlock = 32;      // elements per MXFP4 block
constexpr int kBlockBytes = 16;  // bytes per block
constexpr int kRows = 4;         // weight rows decoded together
constexpr int kPrefetchBlocks = 64;  // software prefetch distance in blocks (512 bytes)
constexpr int kTileRows = 128;   // rows decoded per GEMM tile: 128 x 2880 bf16 stays in L2
constexpr int kGemmMinTokens = 16;  // from this many tokens per expert, decode tiles and use ATen's GEMM (measured crossover)

// GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS overrides the crossover; 0 turns the GEMM path off, which makes every
// token's result independent of how many other tokens share its expert (batch invariance).
int64_t gemm_min_tokens() {
  const char* env = std::getenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS");
  if (env == nullptr || *env == '\0') return kGemmMinTokens;
  const long value = std::strtol(env, nullptr, 10);
  return value <= 0 ? INT64_MAX : value;
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

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512Bf16 = 2 };

// One projection for a group of tokens: out[t][r] = sum_k w[r][k] * act[t][k] + bias[r], for rows
// [row_begin, row_end). `act` rows are block-permuted ([even16|odd16] per block), in fp32 or bf16.
struct Projection {
  const uint8_t* blocks;  // (rows, K/32, 16)
  const uint8_t* scales;  // (rows, K/32)
  const float* bias;      // (rows)
  int64_t k;              // contraction length
  const void* act;        // (n, K) permuted, fp32 (portable/AVX2) or bf16 (AVX-512 BF16)
  int64_t n;              // tokens
  float* out;             // (n, rows)
  int64_t rows;
  bool gemm;              // decode tiles + ATen GEMM (many tokens) instead of the register kernel
};

// ------------------------------------------------------------------------------------------ portable
void decode_rows_f32_portable(const Projection& p, int64_t r0, int64_t nr, float* scratch) {
  const int64_t groups = p.k / kBlock;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * groups * kBlockBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    float* dst = scratch + r * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = e8m0(s[g]);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = b[g * kBlockBytes + j];
        dst[g * kBlock + j] = kFp4[byte & 0x0F] * scale;
        dst[g * kBlock + 16 + j] = kFp4[byte >> 4] * scale;
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
  const int64_t groups = p.k / kBlock;
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i low3 = _mm256_set1_epi32(7);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * groups * kBlockBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    float* dst = scratch + r * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = _mm256_set1_ps(e8m0(s[g]));
      for (int half = 0; half < 2; ++half) {  // bytes 0-7, then 8-15
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + g * kBlockBytes + half * 8));
        const __m256i v = _mm256_cvtepu8_epi32(bytes);
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
        const __m256i hi = _mm256_srli_epi32(v, 4);
        // Magnitude from the low 3 bits, sign from bit 3 moved to the float sign bit.
        __m256 wl = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(lo, low3));
        __m256 wh = _mm256_permutevar8x32_ps(mag, _mm256_and_si256(hi, low3));
        wl = _mm256_xor_ps(wl, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(lo, 3), 31)));
        wh = _mm256_xor_ps(wh, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(hi, 3), 31)));
        _mm256_storeu_ps(dst + g * kBlock + half * 8, _mm256_mul_ps(wl, scale));
        _mm256_storeu_ps(dst + g * kBlock + 16 + half * 8, _mm256_mul_ps(wh, scale));
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
  for (int64_t i = 0; i < k; i += 16) {  // k is a multiple of 32
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  return hsum256(_mm256_add_ps(a0, a1));
}

// ------------------------------------------------------------------------------------ AVX-512 + BF16
// Straight from MXFP4 in registers: 32 bytes (two blocks) widen to 32 words; the low and high nibbles
// index a 32-entry bf16 table (vpermw), giving [A even | B even] and [A odd | B odd]. Activations are laid
// out the same way per 64 elements ([A even | B even | A odd | B odd]; a trailing single block as
// [even | odd]). vdpbf16ps multiplies and adds pairs in fp32; lanes 0-7 hold block A, lanes 8-15 block B,
// so one FMA with the per-lane scale finishes both blocks.
#define GPTOSS_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"

__attribute__((target(GPTOSS_AVX512))) inline __m512i bf16_fp4_table() {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &kFp4[i & 15], sizeof(bits));
    t[i] = static_cast<uint16_t>(bits >> 16);  // every E2M1 value is exact in bf16
  }
  return _mm512_load_si512(t);
}

// Scale factors of 16 consecutive blocks as floats (0xFF -> NaN; 0 -> 0, i.e. 2**-127 flushed).
__attribute__((target(GPTOSS_AVX512))) inline __m512 scales16(const uint8_t* s, int count) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), s));
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(v, 23));
  return _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(255)), f, _mm512_set1_ps(NAN));
}

// Decode rows into bf16, each block as [16 even | 16 odd] with its scale applied (for the GEMM path).
__attribute__((target(GPTOSS_AVX512))) void decode_rows_bf16_avx512(const Projection& p, int64_t r0, int64_t nr,
                                                                     uint16_t* dst) {
  const int64_t groups = p.k / kBlock;
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* b = p.blocks + (r0 + r) * groups * kBlockBytes;
    const uint8_t* s = p.scales + (r0 + r) * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g * kBlockBytes)));
      const __m512 scale = _mm512_set1_ps(e8m0(s[g]));
      const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, nibble), lut), scale);
      const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), scale);
      // cvtne2ps puts its second operand in the low half: [even | odd].
      _mm512_storeu_si512(dst + r * p.k + g * kBlock, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
    }
  }
}

template <int T, int R>
__attribute__((target(GPTOSS_AVX512))) void project_avx512_t(const Projection& p, int64_t row_begin,
                                                              int64_t row_end) {
  const int64_t groups = p.k / kBlock;
  const __m512i lut = bf16_fp4_table();
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  const __m512i pair0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const uint16_t* act = static_cast<const uint16_t*>(p.act);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += R) {
    const int64_t nr = std::min<int64_t>(R, row_end - r0);
    const uint8_t* blk[R];
    const uint8_t* scl[R];
    for (int r = 0; r < R; ++r) {  // missing rows repeat the first one and are not stored
      const int64_t row = r0 + (r < nr ? r : 0);
      blk[r] = p.blocks + row * groups * kBlockBytes;
      scl[r] = p.scales + row * groups;
    }
    for (int64_t t0 = 0; t0 < p.n; t0 += T) {
      const int64_t nt = std::min<int64_t>(T, p.n - t0);
      const uint16_t* xs[T];
      for (int t = 0; t < T; ++t) xs[t] = act + (t0 + (t < nt ? t : 0)) * p.k;
      __m512 acc[T][R];
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
      for (int64_t g16 = 0; g16 < groups; g16 += 16) {
        const int count = static_cast<int>(std::min<int64_t>(16, groups - g16));
        __m512 sc16[R];
        for (int r = 0; r < R; ++r) sc16[r] = scales16(scl[r] + g16, count);
        int j = 0;
        for (; j + 2 <= count; j += 2) {
          const int64_t g = g16 + j;
          const __m512i pick = _mm512_add_epi32(pair0, _mm512_set1_epi32(j));
          __m512bh wlo[R], whi[R];
          __m512 sc[R];
          for (int r = 0; r < R; ++r) {
            // Rows are short streams (1.4 KB for gpt-oss): fetch ahead instead of waiting on the prefetcher.
            _mm_prefetch(reinterpret_cast<const char*>(blk[r] + (g + kPrefetchBlocks) * kBlockBytes), _MM_HINT_T0);
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[r] + g * kBlockBytes)));
            wlo[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, nibble), lut);
            whi[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            sc[r] = _mm512_permutexvar_ps(pick, sc16[r]);
          }
          for (int t = 0; t < T; ++t) {
            const __m512bh xlo = (__m512bh)_mm512_loadu_si512(xs[t] + g * kBlock);
            const __m512bh xhi = (__m512bh)_mm512_loadu_si512(xs[t] + g * kBlock + 32);
            for (int r = 0; r < R; ++r) {
              const __m512 d = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wlo[r], xlo), whi[r], xhi);
              acc[t][r] = _mm512_fmadd_ps(d, sc[r], acc[t][r]);
            }
          }
        }
        if (j < count) {  // one block left: [even | odd] in one register
          const int64_t g = g16 + j;
          __m512bh w[R];
          __m512 sc[R];
          for (int r = 0; r < R; ++r) {
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[r] + g * kBlockBytes)));
            const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, _mm256_set1_epi16(0x0F))),
                                                   _mm256_srli_epi16(v, 4), 1);
            w[r] = (__m512bh)_mm512_permutexvar_epi16(idx, lut);
            sc[r] = _mm512_permutexvar_ps(_mm512_set1_epi32(j), sc16[r]);
          }
          for (int t = 0; t < T; ++t) {
            const __m512bh x = (__m512bh)_mm512_loadu_si512(xs[t] + g * kBlock);
            for (int r = 0; r < R; ++r)
              acc[t][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w[r], x), sc[r], acc[t][r]);
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t r = 0; r < nr; ++r)
          p.out[(t0 + t) * p.rows + r0 + r] = _mm512_reduce_add_ps(acc[t][r]) + p.bias[r0 + r];
    }
  }
}

// Rows decoded together (R) keep more loads in flight; tokens (T) share each decode. T * R accumulators,
// R weight pairs and scales must fit the 32 vector registers.
void project_avx512(const Projection& p, int64_t row_begin, int64_t row_end) {
  if (p.n == 1) return project_avx512_t<1, 4>(p, row_begin, row_end);
  if (p.n == 2) return project_avx512_t<2, 4>(p, row_begin, row_end);
  return project_avx512_t<4, 4>(p, row_begin, row_end);
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
  const bool bf16 = isa == kAvx512Bf16;
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  const auto act = at::from_blob(const_cast<void*>(p.act), {p.n, p.k}, at::TensorOptions().dtype(dtype));
  const int64_t tiles = (p.rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    auto tile = at::empty({kTileRows, p.k}, at::TensorOptions().dtype(dtype));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTileRows, nr = std::min<int64_t>(kTileRows, p.rows - r0);
#ifdef GPTOSS_X86
      if (isa == kAvx512Bf16)
        decode_rows_bf16_avx512(p, r0, nr, static_cast<uint16_t*>(tile.data_ptr()));
      else
#endif
        f32_decoder(isa)(p, r0, nr, tile.data_ptr<float>());
      const auto h = at::mm(act, tile.narrow(0, 0, nr).t()).to(at::kFloat);  // (n, nr)
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
    if (isa == kAvx512Bf16) return project_avx512(p, r0, r1);
    if (isa == kAvx2) return project_f32(p, r0, r1, decode_rows_f32_avx2, dot_avx2);
#endif
    project_f32(p, r0, r1, decode_rows_f32_portable, dot_portable);
  });
}

// Lay a float row out as the kernels read it. fp32 paths: per block [16 even | 16 odd]. bf16 (AVX-512)
// path: per pair of blocks [A even | B even | A odd | B odd], a trailing single block as [even | odd].
// The GEMM path uses the per-block layout, in bf16 on the AVX-512 path.
enum Layout { kBlockF32, kBlockBf16, kPairBf16 };

void permute_row(const float* src, int64_t k, Layout layout, void* dst, int64_t row) {
  if (layout == kBlockF32) {
    float* d = static_cast<float*>(dst) + row * k;
    for (int64_t g = 0; g < k / kBlock; ++g)
      for (int j = 0; j < 16; ++j) {
        d[g * kBlock + j] = src[g * kBlock + 2 * j];
        d[g * kBlock + 16 + j] = src[g * kBlock + 2 * j + 1];
      }
    return;
  }
  if (layout == kBlockBf16) {
    at::BFloat16* d = static_cast<at::BFloat16*>(dst) + row * k;
    for (int64_t g = 0; g < k / kBlock; ++g)
      for (int j = 0; j < 16; ++j) {
        d[g * kBlock + j] = at::BFloat16(src[g * kBlock + 2 * j]);
        d[g * kBlock + 16 + j] = at::BFloat16(src[g * kBlock + 2 * j + 1]);
      }
    return;
  }
  at::BFloat16* d = static_cast<at::BFloat16*>(dst) + row * k;
  const int64_t groups = k / kBlock;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const float* a = src + g * kBlock;
    at::BFloat16* o = d + g * kBlock;
    for (int j = 0; j < 16; ++j) {
      o[j] = at::BFloat16(a[2 * j]);            // A even
      o[16 + j] = at::BFloat16(a[32 + 2 * j]);  // B even
      o[32 + j] = at::BFloat16(a[2 * j + 1]);   // A odd
      o[48 + j] = at::BFloat16(a[33 + 2 * j]);  // B odd
    }
  }
  if (g < groups)
    for (int j = 0; j < 16; ++j) {
      d[g * kBlock + j] = at::BFloat16(src[g * kBlock + 2 * j]);
      d[g * kBlock + 16 + j] = at::BFloat16(src[g * kBlock + 2 * j + 1]);
    }
}

int64_t best_isa() {
#ifdef GPTOSS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512bf16"))
    return kAvx512Bf16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

at::Tensor mxfp4_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                     const at::Tensor& w13_blocks, const at::Tensor& w13_scales, const at::Tensor& w13_bias,
                     const at::Tensor& w2_blocks, const at::Tensor& w2_scales, const at::Tensor& w2_bias,
                     double alpha, double limit, int64_t isa_request) {
  TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0), "mxfp4_moe: bad x/topk shapes");
  TORCH_CHECK(w13_blocks.scalar_type() == at::kByte && w2_blocks.scalar_type() == at::kByte, "blocks must be uint8");
  const int64_t num_tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t experts = w13_blocks.size(0), inter2 = w13_blocks.size(1), inter = inter2 / 2;
  TORCH_CHECK(w13_blocks.size(2) * kBlock == hidden && w2_blocks.size(1) == hidden &&
                  w2_blocks.size(2) * kBlock == inter,
              "mxfp4_moe: weight shapes do not match hidden ", hidden, " / intermediate ", inter);
  const int64_t best = best_isa();
  const Isa isa = static_cast<Isa>(isa_request < 0 ? best : std::min(isa_request, best));
  const bool bf16 = isa == kAvx512Bf16;

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

  const auto act_dtype = bf16 ? at::kBFloat16 : at::kFloat;
  const int64_t gemm_min = gemm_min_tokens();
  const float* xp = xf.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = count[e + 1] - count[e];
    if (n == 0) continue;
    const int64_t* pairs = order.data() + count[e];
    const bool gemm = n >= gemm_min;
    const Layout layout = !bf16 ? kBlockF32 : gemm ? kBlockBf16 : kPairBf16;
    auto xa = at::empty({n, hidden}, xf.options().dtype(act_dtype));
    at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) permute_row(xp + (pairs[t] / top_k) * hidden, hidden, layout, xa.data_ptr(), t);
    });
    auto h = at::empty({n, inter2}, xf.options());
    project({blk13.data_ptr<uint8_t>() + e * inter2 * hidden / 2, sc13.data_ptr<uint8_t>() + e * inter2 * hidden / kBlock,
             b13.data_ptr<float>() + e * inter2, hidden, xa.data_ptr(), n, h.data_ptr<float>(), inter2, gemm},
            isa);
    // gpt-oss SwiGLU on interleaved (gate, linear) pairs, then the same block layout for the down projection.
    auto act = at::empty({n, inter}, xf.options());
    const float a = static_cast<float>(alpha), lim = static_cast<float>(limit);
    float* hp = h.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    at::parallel_for(0, n * inter, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float g = std::min(hp[2 * i], lim);
        const float l = std::max(std::min(hp[2 * i + 1], lim), -lim);
        ap[i] = g / (1.0f + std::exp(-a * g)) * (l + 1.0f);
      }
    });
    auto aa = at::empty({n, inter}, xf.options().dtype(act_dtype));
    at::parallel_for(0, n, 1, [&](int64_t s, int64_t t1) {
      for (int64_t t = s; t < t1; ++t) permute_row(ap + t * inter, inter, layout, aa.data_ptr(), t);
    });
    auto y = at::empty({n, hidden}, xf.options());
    project({blk2.data_ptr<uint8_t>() + e * hidden * inter / 2, sc2.data_ptr<uint8_t>() + e * hidden * inter / kBlock,
             b2.data_ptr<float>() + e * hidden, inter, aa.data_ptr(), n, y.data_ptr<float>(), hidden, gemm},
            isa);
    // Routing-weighted sum; tokens of one expert are distinct, so rows never collide.
    const float* yp = y.data_ptr<float>();
    const float* wp = tw.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t s, int64_t t1) {
      for (int64_t t = s; t < t1; ++t) {
        const int64_t token = pairs[t] / top_k;
        const float w = wp[pairs[t]];
        for (int64_t j = 0; j < hidden; ++j) outp[token * hidden + j] += w * yp[t * hidden + j];
      }
    });
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(gptoss_vllm_cpu, m) {
  m.def(
      "mxfp4_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_blocks, Tensor w13_scales, "
      "Tensor w13_bias, Tensor w2_blocks, Tensor w2_scales, Tensor w2_bias, float alpha, float limit, "
      "int isa) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(gptoss_vllm_cpu, CPU, m) { m.impl("mxfp4_moe", &mxfp4_moe); }
