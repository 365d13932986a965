// Fused MXFP4 MoE for CPUs: the gpt-oss expert MLP computed straight from MXFP4 weights. This file holds
// the torch ops, the weight packing and the scheduler; the kernels for each ISA are in generic.cpp and
// x86/, behind the contract in mxfp4_kernels.h (which also describes the packed layout).
//
// Per expert, for the tokens routed to it: h = x W13^T + b13, the gpt-oss SwiGLU variant,
// y = act W2^T + b2, then out[token] += routing_weight * y.
//
// ISA paths, chosen at run time: AVX-512 (int8 VNNI dot products at small batches, BF16 tiles for ATen's
// GEMM at large ones), AVX2+FMA (fp32), and the generic one. All accumulate in fp32. Threads come from
// ATen's pool (torch.get_num_threads()).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mxfp4_kernels.h"

namespace {

using namespace gptoss_cpu;

constexpr uint8_t kPadScale = 127;  // scale of padding blocks (1.0; their codes are zero)
constexpr int kTileRows = 512;      // rows decoded per GEMM tile: oneDNN repacks every tile, so few large calls
// From this many tokens per expert the kernel decodes tiles and uses ATen's GEMM; the caller passes it
// (GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS, default 24: the measured crossover). <= 0 turns the GEMM path off, which
// makes every token's result independent of how many other tokens share its expert (batch invariance).

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
// (rows/4, Kp/128, 4, 4): see mxfp4_kernels.h.
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

DecodeF32 f32_decoder(Isa isa) {
#ifdef GPTOSS_X86
  if (isa == kAvx2) return decode_rows_f32_avx2;
#endif
  return decode_rows_f32_generic;
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
    if (isa == kAvx512) return project_vnni_avx512(p, r0, r1);
    if (isa == kAvx2) return project_f32(p, r0, r1, decode_rows_f32_avx2, dot_f32_avx2);
#endif
    project_f32(p, r0, r1, decode_rows_f32_generic, dot_f32_generic);
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
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("avx512bf16"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

std::vector<std::string> isa_names() { return {std::begin(kIsaNames), std::end(kIsaNames)}; }

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
  m.def("isa_names() -> str[]", &isa_names);
}

TORCH_LIBRARY_IMPL(gptoss_vllm_cpu, CPU, m) {
  m.impl("mxfp4_moe", &mxfp4_moe);
  m.impl("mxfp4_prepack", &mxfp4_prepack);
}
