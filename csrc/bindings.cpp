// Plain pybind11 module deis_fast._C (no torch headers): raw pointers as integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "combine_api.h"

namespace py = pybind11;

namespace {

df::Params make_params(uintptr_t out, const std::vector<uintptr_t>& srcs, const std::vector<double>& coefs,
                       uintptr_t noise, double noise_coef, int64_t numel) {
  if (srcs.empty() || srcs.size() > (size_t)df::kMaxSources)
    throw std::invalid_argument("combine: 1 to " + std::to_string(df::kMaxSources) + " sources required, got " +
                                std::to_string(srcs.size()));
  if (coefs.size() != srcs.size())
    throw std::invalid_argument("combine: number of coefficients does not match number of sources");
  if (numel < 0) throw std::invalid_argument("combine: negative numel");
  df::Params p{};
  p.out = reinterpret_cast<void*>(out);
  for (size_t j = 0; j < srcs.size(); ++j) {
    p.src[j] = reinterpret_cast<const void*>(srcs[j]);
    p.coefs.c[j] = (float)coefs[j];
  }
  p.noise = reinterpret_cast<const void*>(noise);
  p.coefs.c[6] = (float)noise_coef;
  p.n = numel;
  p.aligned = df::all_aligned16(p, (int)srcs.size());
  return p;
}

void combine_cpu(uintptr_t out, const std::vector<uintptr_t>& srcs, const std::vector<double>& coefs, uintptr_t noise,
                 double noise_coef, int64_t numel, int dtype, int nthreads) {
  df::Params p = make_params(out, srcs, coefs, noise, noise_coef, numel);
  bool ok;
  {
    py::gil_scoped_release release;
    ok = df::combine_cpu(p, (int)srcs.size(), noise != 0, dtype, nthreads);
  }
  if (!ok) throw std::invalid_argument("combine_cpu: unsupported dtype code " + std::to_string(dtype));
}

#if defined(DF_WITH_CUDA)
void combine_cuda(uintptr_t out, const std::vector<uintptr_t>& srcs, const std::vector<double>& coefs, uintptr_t noise,
                  double noise_coef, int64_t numel, int dtype, uintptr_t stream) {
  df::Params p = make_params(out, srcs, coefs, noise, noise_coef, numel);
  const std::string err = df::combine_cuda(p, (int)srcs.size(), noise != 0, dtype, stream);
  if (!err.empty()) throw std::runtime_error(err);
}
#endif

// Run the CUDA thread body on the host for every (block, thread) id of a simulated grid of
// `grid` x `block` threads, over elements [begin, begin + numel) of pointers that are
// shifted back by `begin` elements (so indices >= 2^31 can be exercised on a small buffer).
// `force_scalar` disables the 128-bit path. Returns whether the vector path was taken.
bool cuda_body_on_host(uintptr_t out, const std::vector<uintptr_t>& srcs, const std::vector<double>& coefs,
                       uintptr_t noise, double noise_coef, int64_t numel, int dtype, int64_t grid, int64_t block,
                       int64_t begin, bool force_scalar) {
  if (grid <= 0 || block <= 0) throw std::invalid_argument("grid and block must be positive");
  df::Params p = make_params(out, srcs, coefs, noise, noise_coef, numel);
  const int64_t esize = dtype == df::kF32 ? 4 : 2;
  // Shift every pointer back by `begin` elements: element i of the span is index begin + i.
  auto shift = [&](const void* ptr) -> uintptr_t {
    return ptr ? reinterpret_cast<uintptr_t>(ptr) - (uintptr_t)(begin * esize) : 0;
  };
  p.out = reinterpret_cast<void*>(shift(p.out));
  for (size_t j = 0; j < srcs.size(); ++j) p.src[j] = reinterpret_cast<const void*>(shift(p.src[j]));
  p.noise = reinterpret_cast<const void*>(shift(p.noise));
  p.n = begin + numel;
  p.aligned = force_scalar ? 0 : df::all_aligned16(p, (int)srcs.size());
  const int64_t nthreads = grid * block;
  const bool ok = df::dispatch(dtype, (int)srcs.size(), noise != 0, [&]<class T, int NS, bool HN>() {
    for (int64_t b = 0; b < grid; ++b)
      for (int64_t t = 0; t < block; ++t) df::combine_thread<T, NS, HN>(p, begin, b * block + t, nthreads);
  });
  if (!ok) throw std::invalid_argument("cuda_body_on_host: unsupported dtype code");
  const int64_t w = 16 / esize;
  return p.aligned && begin % w == 0;
}

// Bit-exact conversion helpers exposed for tests.
uint16_t f32_to_f16_bits(float f) { return df::float_to_half(f); }
uint16_t f32_to_bf16_bits(float f) { return df::float_to_bf16(f); }
float f16_bits_to_f32(uint16_t h) { return df::half_to_float(h); }
float bf16_bits_to_f32(uint16_t h) { return df::bf16_to_float(h); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deis_fast fused combine kernels (CPU always, CUDA when built with nvcc)";
  m.def("combine_cpu", &combine_cpu, py::arg("out_ptr"), py::arg("src_ptrs"), py::arg("coefs"), py::arg("noise_ptr"),
        py::arg("noise_coef"), py::arg("numel"), py::arg("dtype_code"), py::arg("nthreads") = 1,
        "out = sum_j coefs[j] * src_j (+ noise_coef * noise) on CPU memory; releases the GIL.");
#if defined(DF_WITH_CUDA)
  m.def("combine_cuda", &combine_cuda, py::arg("out_ptr"), py::arg("src_ptrs"), py::arg("coefs"), py::arg("noise_ptr"),
        py::arg("noise_coef"), py::arg("numel"), py::arg("dtype_code"), py::arg("stream"),
        "Same op on CUDA memory, launched on `stream` (cudaStream_t as integer).");
#endif
  m.def("has_cuda", []() {
#if defined(DF_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_body_on_host", &cuda_body_on_host, py::arg("out_ptr"), py::arg("src_ptrs"), py::arg("coefs"),
        py::arg("noise_ptr"), py::arg("noise_coef"), py::arg("numel"), py::arg("dtype_code"), py::arg("grid"),
        py::arg("block"), py::arg("begin") = 0, py::arg("force_scalar") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("f32_to_f16_bits", &f32_to_f16_bits);
  m.def("f32_to_bf16_bits", &f32_to_bf16_bits);
  m.def("f16_bits_to_f32", &f16_bits_to_f32);
  m.def("bf16_bits_to_f32", &bf16_bits_to_f32);
  m.attr("DTYPE_F32") = (int)df::kF32;
  m.attr("DTYPE_F16") = (int)df::kF16;
  m.attr("DTYPE_BF16") = (int)df::kBF16;
  m.attr("MAX_SOURCES") = df::kMaxSources;
  py::dict codes;
  codes["float32"] = (int)df::kF32;
  codes["float16"] = (int)df::kF16;
  codes["bfloat16"] = (int)df::kBF16;
  m.attr("DTYPE_CODES") = codes;
}
