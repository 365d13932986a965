// The portable kernels: plain C++, any CPU. The reference the ISA files are checked against in tests.

#include "mxfp4_kernels.h"

namespace gptoss_cpu {

void decode_rows_f32_generic(const Projection& p, int64_t r0, int64_t nr, float* dst) {
  for_each_row_superblock(p, r0, nr, dst, [](float* out, const uint8_t* c, const uint8_t* s) {
    for (int chunk = 0; chunk < kStepBytes / kChunkBytes; ++chunk)
      for (int i = 0; i < 16; ++i) {  // byte 4j + b: positions 32 chunk + i (low nibble) and + 16 (high)
        const uint8_t byte = c[chunk * kChunkBytes + i];
        const float scale = e8m0(s[i / 4]);
        out[32 * chunk + i] = kFp4[byte & 0x0F] * scale;
        out[32 * chunk + 16 + i] = kFp4[byte >> 4] * scale;
      }
  });
}

float dot_f32_generic(const float* w, const float* x, int64_t k) {
  float acc = 0.0f;
  for (int64_t i = 0; i < k; ++i) acc += w[i] * x[i];
  return acc;
}

}  // namespace gptoss_cpu
