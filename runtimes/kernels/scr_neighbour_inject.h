// SCRNeighbourInject: the C interface shared by the CUDA launcher, the CPU implementation and the ORT op library.
#pragma once
#include <stdint.h>

#define SCR_DTYPE_F32 0
#define SCR_DTYPE_F16 1
#define SCR_DTYPE_BF16 2

#ifdef __cplusplus
extern "C" {
#endif
// Threads per block for a row of `dim` elements read `vec` at a time (mirrored by runtimes/kernels/launch.py).
int scr_block_threads(int64_t dim, int vec);
// Enqueue the kernel on `stream` (a cudaStream_t); returns a cudaError_t (0 = success).
int scr_neighbour_inject_launch(int dtype, const void* h, const int64_t* donor, const float* scale, const float* weight,
                                void* out, int64_t batch, int64_t seq, int64_t dim, void* stream);
#ifdef __cplusplus
}
#endif
