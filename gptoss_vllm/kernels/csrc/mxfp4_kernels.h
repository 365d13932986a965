// The contract between the scheduler (mxfp4_moe.cpp) and the per-ISA kernels: the packed weight layout,
// one projection's arguments, the ISA enum and each ISA file's entry points.
//
// Layout. Weights are pre-packed once at load time (mxfp4_prepack), still 4.25 bits per weight. Rows are
// padded with zero blocks to whole superblocks of 4 MXFP4 blocks (128 elements) and taken 4 at a time (a
// row group). One step of a kernel is one superblock of one row group: 256 bytes of codes and 16 bytes of
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
// Linkage. Each ISA file is compiled with its own -m flags (kernels/build.py). Besides the entry points
// declared here, everything an ISA file defines has internal linkage, and this header defines only
// constants, data types and static inline functions: an inline function with external linkage compiled
// with AVX-512 flags in one file may be the copy the linker keeps for every file, and crash a CPU without
// AVX-512. For the same reason the ISA files include no ATen or standard-library templates.

#pragma once

#include <cstdint>
#include <cstring>

namespace gptoss_cpu {

constexpr int kBlock = 32;       // elements per MXFP4 block
constexpr int kBlockBytes = 16;  // bytes per checkpoint block
constexpr int kSuper = 128;      // elements per superblock (4 blocks)
constexpr int kSuperBlocks = kSuper / kBlock;
constexpr int kGroupRows = 4;                           // rows per row group
constexpr int kStepBytes = kGroupRows * kSuper / 2;     // code bytes per step (a superblock of a row group)
constexpr int kStepScales = kGroupRows * kSuperBlocks;  // scale bytes per step
constexpr int kChunkBytes = 64;                         // a step's codes are 4 such vectors
constexpr float kFp4[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The kernel paths, in order of preference. The op isa_names() hands Python these names, indexed by value,
// so that they are written once.
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512"};

static inline int64_t padded(int64_t k) { return (k + kSuper - 1) / kSuper * kSuper; }

// Where element e of a (padded) row sits in kernel order: p = 16 i + 4 j + b for e = 32 j + 4 i + b.
static inline int64_t kernel_position(int64_t e) {
  const int64_t w = e % kSuper;
  return e - w + (w % kBlock) / 4 * 16 + w / kBlock * 4 + w % 4;
}

// E8M0 byte -> float: 2**(s - 127) built from its bits (s = 0 is the subnormal 2**-127), 0xFF -> NaN.
static inline float e8m0(uint8_t s) {
  const uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : static_cast<uint32_t>(s) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// One projection for a group of tokens: out[t][r] = sum_k w[r][k] * act[t][k] + bias[r], rows split over
// threads in whole row groups. K is padded to whole superblocks; activations are zero past the real K and
// in kernel order.
struct Projection {
  const uint8_t* blocks;      // (rows/4, K/128, 4, 64) packed codes
  const uint8_t* scales;      // (rows/4, K/128, 4, 4)
  const float* bias;          // (rows)
  int64_t k;                  // padded contraction length
  const void* act;            // (n, K): fp32 (portable/AVX2), bf16 (AVX-512 GEMM) or int8 (AVX-512 VNNI)
  const float* act_scale;     // VNNI: (n, K/32) each block's scale (x 0.5, the codes' factor)
  const int32_t* act_offset;  // VNNI: (n, K/32) -12 * sum of each block's int8 codes
  int64_t n;                  // tokens
  float* out;                 // (n, rows)
  int64_t rows;
  bool gemm;  // decode tiles + ATen GEMM (many tokens) instead of the register kernel
};

static inline const uint8_t* step_codes(const Projection& p, int64_t group, int64_t sb) {
  return p.blocks + (group * (p.k / kSuper) + sb) * kStepBytes;
}
static inline const uint8_t* step_scales(const Projection& p, int64_t group, int64_t sb) {
  return p.scales + (group * (p.k / kSuper) + sb) * kStepScales;
}

// The decoders' walk: for each of rows [r0, r0 + nr) (whole row groups) and each superblock, calls
// visit(out, codes, scales): out is where the superblock's 128 values go in dst (row-major, p.k per row),
// codes the row's 16 bytes of chunk 0 (chunk c is c * kChunkBytes on), scales its 4 block scales.
template <typename T, typename Visit>
static inline void for_each_row_superblock(const Projection& p, int64_t r0, int64_t nr, T* dst, Visit&& visit) {
  for (int64_t row = r0; row < r0 + nr; ++row) {
    const int64_t group = row / kGroupRows, r = row % kGroupRows;
    for (int64_t sb = 0; sb < p.k / kSuper; ++sb)
      visit(dst + (row - r0) * p.k + sb * kSuper, step_codes(p, group, sb) + 16 * r, step_scales(p, group, sb) + 4 * r);
  }
}

// generic.cpp: any CPU.
// Decode rows [r0, r0 + nr) (whole row groups) to fp32 in kernel order, scales applied.
void decode_rows_f32_generic(const Projection& p, int64_t r0, int64_t nr, float* dst);
float dot_f32_generic(const float* w, const float* x, int64_t k);

#if defined(__x86_64__) || defined(_M_X64)
#define GPTOSS_X86 1
// x86/avx2.cpp: AVX2 and FMA. The same contracts as the generic pair.
void decode_rows_f32_avx2(const Projection& p, int64_t r0, int64_t nr, float* dst);
float dot_f32_avx2(const float* w, const float* x, int64_t k);

// x86/avx512.cpp: AVX-512 F, BW, VL, DQ, BF16 and VNNI.
// Decode rows [r0, r0 + nr) (whole row groups) to bf16 in kernel order, scales applied (GEMM tiles).
void decode_rows_bf16_avx512(const Projection& p, int64_t r0, int64_t nr, uint16_t* dst);
// fp32 rows (real length k_real, zero past it up to k) to int8 codes in kernel order, with each block's
// scale and offset, as Projection's act, act_scale and act_offset.
void quantise_rows_avx512(const float* const* src, int64_t n, int64_t k_real, int64_t k, int8_t* q, float* scale,
                          int32_t* offset);
// Rows [row_begin, row_end) (whole row groups) of p for all its tokens, on int8 activations.
void project_vnni_avx512(const Projection& p, int64_t row_begin, int64_t row_end);
#endif

// An Arm file (arm/neon.cpp) would declare its entry points here: see arm/README.md.

}  // namespace gptoss_cpu
