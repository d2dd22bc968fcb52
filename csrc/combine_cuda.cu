// CUDA kernel of the combine op. No torch/ATen headers: raw pointers, dtype code, stream handle.
#include <cuda_runtime.h>

#include <string>

#include "combine_api.h"

namespace df {
namespace {

constexpr int kBlock = 256;

template <class T, int NS, bool HAS_NOISE>
__global__ void __launch_bounds__(kBlock) combine_kernel(Params p) {
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t nthreads = (int64_t)gridDim.x * blockDim.x;
  combine_thread<T, NS, HAS_NOISE>(p, 0, tid, nthreads);
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 132;
  return sms;
}

template <class T, int NS, bool HAS_NOISE>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  using S = typename T::storage;
  constexpr int64_t W = Pack16<S>::kN;
  const int64_t work = p.aligned ? (p.n + W - 1) / W : p.n;
  static thread_local int sms = 0;  // per host thread; device rarely changes between calls
  if (sms == 0) sms = sm_count();
  int64_t blocks = (work + kBlock - 1) / kBlock;
  const int64_t cap = (int64_t)sms * 16;  // enough resident warps to saturate HBM; grid-stride beyond
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  combine_kernel<T, NS, HAS_NOISE><<<(unsigned)blocks, kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

std::string combine_cuda(const Params& p, int ns, bool has_noise, int dtype, uintptr_t stream) {
  if (p.n <= 0) return std::string();
  cudaError_t err = cudaSuccess;
  const bool ok = dispatch(dtype, ns, has_noise, [&]<class T, int NS, bool HN>() {
    err = launch<T, NS, HN>(p, reinterpret_cast<cudaStream_t>(stream));
  });
  if (!ok) return "combine_cuda: unsupported dtype code or number of sources";
  if (err != cudaSuccess) return std::string("combine_cuda: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  return std::string();
}

}  // namespace df
