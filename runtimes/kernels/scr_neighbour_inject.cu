// SCRNeighbourInject, the CUDA kernel: the one implementation behind the ONNX Runtime CUDA custom op and the
// TensorRT plugin (whose ahead-of-time implementation embeds this file's PTX in the engine).
//
//   out[b,t,:] = scale[b,t] * h[b,t,:] + weight[b,t] * h[b, donor[b,t], :]          (SCR.md, pass 2, one layer)
//
// h/out [B,T,D] in float32, float16 or bfloat16; donor [B,T] int64; scale, weight [B,T] float32. The arithmetic is
// float32 and rounded as the reference rounds it (two products, then the sum; no FMA contraction), so float32
// results are bit-identical to the numpy reference and half types differ only by the final rounding they share.
// Rows with scale == 1 and weight == 0 are copied untouched (an identity plan is bit-exact and reads no donor).
// A donor outside [0, T) writes NaN to that row: an invalid plan shows up instead of reading foreign memory.
//
// One block per (b,t) row (grid.x = B*T), threads stride over the row in 16-byte vectors: coalesced 128-bit loads
// and stores when D is a multiple of the vector width (the *_v entries; they fall back to element-wise access by
// themselves if a buffer is not 16-byte aligned), element-wise otherwise.
//
// Entry points follow TensorRT's ahead-of-time plugin contract: input pointers, then int32 scalars, then outputs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace scr {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float combine(float s, float h, float w, float g) {
  return __fadd_rn(__fmul_rn(s, h), __fmul_rn(w, g));
}

// VEC elements of T per 16-byte load (VEC == 1: element-wise).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void inject_row(const T* __restrict__ h, const int64_t* __restrict__ donor,
                                           const float* __restrict__ scale, const float* __restrict__ weight,
                                           int seq, int dim, T* __restrict__ out) {
  if (VEC > 1 && ((reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(out)) % 16 != 0)) {
    inject_row<T, 1>(h, donor, scale, weight, seq, dim, out);  // misaligned buffers: element-wise, still correct
    return;
  }
  const int64_t row = blockIdx.x;  // b * seq + t
  const int64_t b = row / seq;
  const float s = scale[row];
  const float w = weight[row];
  const int64_t d = donor[row];
  const int n = dim / VEC;
  using P = Pack<T, VEC>;
  const P* src = reinterpret_cast<const P*>(h + row * dim);
  P* dst = reinterpret_cast<P*>(out + row * dim);
  if (s == 1.0f && w == 0.0f) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    return;
  }
  if (d < 0 || d >= seq) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(__int_as_float(0x7fc00000));
      dst[i] = o;
    }
    return;
  }
  const P* don = reinterpret_cast<const P*>(h + (b * seq + d) * dim);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P a = src[i];
    const P g = don[i];
    P o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(combine(s, to_float(a.v[k]), w, to_float(g.v[k])));
    dst[i] = o;
  }
}

}  // namespace scr

#define SCR_ENTRY(NAME, T, VEC)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) NAME(const T* __restrict__ h, const int64_t* __restrict__ donor, \
                                                         const float* __restrict__ scale,                         \
                                                         const float* __restrict__ weight, int seq, int dim,      \
                                                         T* __restrict__ out) {                                   \
    scr::inject_row<T, VEC>(h, donor, scale, weight, seq, dim, out);                                              \
  }

SCR_ENTRY(scr_neighbour_inject_f32, float, 1)
SCR_ENTRY(scr_neighbour_inject_f32_v4, float, 4)
SCR_ENTRY(scr_neighbour_inject_f16, __half, 1)
SCR_ENTRY(scr_neighbour_inject_f16_v8, __half, 8)
SCR_ENTRY(scr_neighbour_inject_bf16, __nv_bfloat16, 1)
SCR_ENTRY(scr_neighbour_inject_bf16_v8, __nv_bfloat16, 8)

#ifndef SCR_PTX_ONLY
// Host launcher for the ONNX Runtime CUDA custom op and the benchmarks (not part of the PTX).
#include "scr_neighbour_inject.h"

extern "C" int scr_block_threads(int64_t dim, int vec) {
  int64_t n = (dim + vec - 1) / vec;
  int64_t t = ((n + 31) / 32) * 32;
  return (int)(t < 32 ? 32 : (t > 256 ? 256 : t));
}

extern "C" int scr_neighbour_inject_launch(int dtype, const void* h, const int64_t* donor, const float* scale,
                                           const float* weight, void* out, int64_t batch, int64_t seq, int64_t dim,
                                           void* stream) {
  const int64_t rows = batch * seq;
  if (rows == 0 || dim == 0) return 0;
  if (rows > 2147483647LL || dim > 2147483647LL || seq > 2147483647LL) return (int)cudaErrorInvalidValue;
  const int elem = dtype == SCR_DTYPE_F32 ? 4 : 2;
  const int vec = 16 / elem;
  const bool aligned = dim % vec == 0 && ((uintptr_t)h % 16 == 0) && ((uintptr_t)out % 16 == 0);
  const dim3 grid((unsigned)rows);
  const dim3 block(scr_block_threads(dim, aligned ? vec : 1));
  cudaStream_t s = (cudaStream_t)stream;
  const int sq = (int)seq, dm = (int)dim;
  switch (dtype) {
    case SCR_DTYPE_F32:
      if (aligned) scr_neighbour_inject_f32_v4<<<grid, block, 0, s>>>((const float*)h, donor, scale, weight, sq, dm, (float*)out);
      else scr_neighbour_inject_f32<<<grid, block, 0, s>>>((const float*)h, donor, scale, weight, sq, dm, (float*)out);
      break;
    case SCR_DTYPE_F16:
      if (aligned) scr_neighbour_inject_f16_v8<<<grid, block, 0, s>>>((const __half*)h, donor, scale, weight, sq, dm, (__half*)out);
      else scr_neighbour_inject_f16<<<grid, block, 0, s>>>((const __half*)h, donor, scale, weight, sq, dm, (__half*)out);
      break;
    case SCR_DTYPE_BF16:
      if (aligned) scr_neighbour_inject_bf16_v8<<<grid, block, 0, s>>>((const __nv_bfloat16*)h, donor, scale, weight, sq, dm, (__nv_bfloat16*)out);
      else scr_neighbour_inject_bf16<<<grid, block, 0, s>>>((const __nv_bfloat16*)h, donor, scale, weight, sq, dm, (__nv_bfloat16*)out);
      break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
#endif
