// Entry points of the combine kernels (raw pointers, no torch headers).
#pragma once
#include <cstdint>
#include <string>
#include "combine.h"

namespace df {

// CPU kernel (OpenMP over chunks, vectorized inner loop). Returns false on unsupported dtype/ns.
bool combine_cpu(const Params& p, int ns, bool has_noise, int dtype, int nthreads);

// CUDA kernel on `stream` (a cudaStream_t as an integer). Returns an empty string on success,
// otherwise the error message. Only defined when built with CUDA (DF_WITH_CUDA).
std::string combine_cuda(const Params& p, int ns, bool has_noise, int dtype, uintptr_t stream);

}  // namespace df
