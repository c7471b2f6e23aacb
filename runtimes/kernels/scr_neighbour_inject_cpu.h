// SCRNeighbourInject on the CPU: the same contract and rounding as scr_neighbour_inject.cu.
//   out[b,t,:] = scale[b,t] * h[b,t,:] + weight[b,t] * h[b, donor[b,t], :]
// Build with -ffp-contract=off: the products and the sum are rounded separately, as in the reference.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace scr {

// IEEE half / bfloat16 <-> float32, round-to-nearest-even (as numpy and ml_dtypes convert).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (ax >= 0x477ff000u) return sign | 0x7c00u;                                 // rounds to inf
  if (ax < 0x38800000u) {                                                       // subnormal half or zero
    if (ax < 0x33000000u) return sign;                                          // below half of the smallest
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                                             // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return sign | (uint16_t)r;
  }
  uint32_t r = ((ax >> 13) - ((127 - 15) << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | (uint16_t)r;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

template <typename Ty>
inline void combine_row(const typename Ty::storage* src, const typename Ty::storage* g, float s, float w, int64_t dim,
                        typename Ty::storage* dst) {
  for (int64_t i = 0; i < dim; ++i) {
    const float a = s * Ty::load(src[i]);
    const float c = w * Ty::load(g[i]);
    dst[i] = Ty::store(a + c);
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
// float16 rows with the F16C conversion instructions when the CPU has them (checked at run time; the library stays
// portable to x86-64 CPUs without them). Same rounding: IEEE round-to-nearest-even, products and sum rounded apart.
__attribute__((target("avx,f16c"))) inline void combine_row_f16c(const uint16_t* src, const uint16_t* g, float s,
                                                                  float w, int64_t dim, uint16_t* dst) {
  const __m256 vs = _mm256_set1_ps(s), vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i)));
    const __m256 o = _mm256_add_ps(_mm256_mul_ps(vs, a), _mm256_mul_ps(vw, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < dim; ++i) dst[i] = float_to_half(s * half_to_float(src[i]) + w * half_to_float(g[i]));
}

inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

template <>
inline void combine_row<F16>(const uint16_t* src, const uint16_t* g, float s, float w, int64_t dim, uint16_t* dst) {
  if (cpu_has_f16c()) return combine_row_f16c(src, g, s, w, dim, dst);
  for (int64_t i = 0; i < dim; ++i) dst[i] = float_to_half(s * half_to_float(src[i]) + w * half_to_float(g[i]));
}
#elif defined(__aarch64__)
// AArch64 (Jetson): hardware half conversions through __fp16.
template <>
inline void combine_row<F16>(const uint16_t* src, const uint16_t* g, float s, float w, int64_t dim, uint16_t* dst) {
  const __fp16* a = reinterpret_cast<const __fp16*>(src);
  const __fp16* b = reinterpret_cast<const __fp16*>(g);
  __fp16* o = reinterpret_cast<__fp16*>(dst);
  for (int64_t i = 0; i < dim; ++i) {
    const float x = s * (float)a[i];
    const float y = w * (float)b[i];
    o[i] = (__fp16)(x + y);
  }
}
#endif

// Returns false (and writes nothing more) when a donor is outside [0, seq).
template <typename Ty>
bool inject_cpu(const typename Ty::storage* h, const int64_t* donor, const float* scale, const float* weight,
                int64_t batch, int64_t seq, int64_t dim, typename Ty::storage* out) {
  for (int64_t row = 0; row < batch * seq; ++row) {
    const int64_t b = row / seq, d = donor[row];
    const float s = scale[row], w = weight[row];
    const typename Ty::storage* src = h + row * dim;
    typename Ty::storage* dst = out + row * dim;
    if (s == 1.0f && w == 0.0f) {  // identity row: untouched
      if (dst != src) std::memcpy(dst, src, sizeof(*src) * dim);
      continue;
    }
    if (d < 0 || d >= seq) return false;
    combine_row<Ty>(src, h + (b * seq + d) * dim, s, w, dim, dst);
  }
  return true;
}

}  // namespace scr
