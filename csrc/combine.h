// deis_fast combine op: the per-element formula and the CUDA thread body, written once.
//
//   out[i] = sum_{j<NS} c[j] * src_j[i]  (+ c[6] * noise[i])      accumulated in fp32
//
// This header is compiled by the host compiler (CPU kernel, host tests of the CUDA thread
// body) and by nvcc (CUDA kernel). It includes no CUDA header on the host: fp16/bf16 are
// carried as raw uint16_t bits and converted with bit-exact round-to-nearest-even code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace df {

constexpr int kMaxSources = 6;

// dtype codes shared with Python (deis_fast/kernels/dispatch.py)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Coefficients passed by value: c[0..5] sources, c[6] noise.
struct Coefs {
  float c[7];
};

// Raw launch parameters (pointers already offset to the first element of the dense span).
struct Params {
  void* out;
  const void* src[kMaxSources];
  const void* noise;  // may be null when there is no noise
  int64_t n;          // number of elements
  Coefs coefs;
  int aligned;        // 1 when every pointer is 16-byte aligned (vector path allowed)
};

// ------------------------------------------------------------------------------------
// Bit-exact scalar conversions (host versions; device uses the hardware intrinsics).
// ------------------------------------------------------------------------------------
DF_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DF_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DF_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24 (exact in fp32)
  const float mag = (float)man * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
#endif
}

DF_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan (keep a quiet nan)
    return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u));
  }
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520 -> inf
  if (ax >= 0x38800000u) {  // normal half (|f| >= 2^-14)
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);  // round to nearest even at bit 13
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
  }
  if (ax <= 0x33000000u) return sign;  // |f| <= 2^-25 rounds to zero (tie at 2^-25 -> even = 0)
  // subnormal half: value = m * 2^-24, m = round_ne(|f| * 2^24)
  const uint32_t e = ax >> 23;               // 102 .. 112
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;           // 14 .. 24 ; |f| * 2^24 = m >> shift
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  const uint32_t up = (rem > halfway) || (rem == halfway && (q & 1u));
  return (uint16_t)(sign | (q + up));
#endif
}

DF_HD float bf16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(h));
#else
  return bits_to_float((uint32_t)h << 16);
#endif
}

DF_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet nan
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);               // round to nearest even
#endif
}

// ------------------------------------------------------------------------------------
// Storage traits: load to fp32 / store from fp32.
// ------------------------------------------------------------------------------------
struct F32 {
  using storage = float;
  static DF_HD float load(float v) { return v; }
  static DF_HD float store(float v) { return v; }
};
struct F16 {
  using storage = uint16_t;
  static DF_HD float load(uint16_t v) { return half_to_float(v); }
  static DF_HD uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using storage = uint16_t;
  static DF_HD float load(uint16_t v) { return bf16_to_float(v); }
  static DF_HD uint16_t store(float v) { return float_to_bf16(v); }
};

// ------------------------------------------------------------------------------------
// THE formula (fp32 accumulation). v[j] = source values, z = noise value.
// ------------------------------------------------------------------------------------
template <int NS, bool HAS_NOISE>
DF_HD float combine_value(const float (&v)[NS], float z, const Coefs& c) {
  static_assert(NS >= 1 && NS <= kMaxSources, "1..6 sources");
  float acc = c.c[0] * v[0];
#pragma unroll
  for (int j = 1; j < NS; ++j) acc += c.c[j] * v[j];
  if (HAS_NOISE) acc += c.c[6] * z;
  return acc;
}

// One element i (int64 index), any dtype. out may alias a source: all reads happen first.
template <class T, int NS, bool HAS_NOISE>
DF_HD void combine_element(const Params& p, int64_t i) {
  using S = typename T::storage;
  float v[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) v[j] = T::load(static_cast<const S*>(p.src[j])[i]);
  const float z = HAS_NOISE ? T::load(static_cast<const S*>(p.noise)[i]) : 0.0f;
  static_cast<S*>(p.out)[i] = T::store(combine_value<NS, HAS_NOISE>(v, z, p.coefs));
}

// 16-byte pack: one 128-bit load/store (ld.global.v4 on the device).
template <class S>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / (int)sizeof(S);
  S v[kN];
};

// One 128-bit vector (index in units of packs).
template <class T, int NS, bool HAS_NOISE>
DF_HD void combine_pack(const Params& p, int64_t k) {
  using S = typename T::storage;
  using P = Pack16<S>;
  constexpr int W = P::kN;
  P in[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) in[j] = static_cast<const P*>(p.src[j])[k];
  P zp;
  if (HAS_NOISE) zp = static_cast<const P*>(p.noise)[k];
  P o;
#pragma unroll
  for (int e = 0; e < W; ++e) {
    float v[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) v[j] = T::load(in[j].v[e]);
    const float z = HAS_NOISE ? T::load(zp.v[e]) : 0.0f;
    o.v[e] = T::store(combine_value<NS, HAS_NOISE>(v, z, p.coefs));
  }
  static_cast<P*>(p.out)[k] = o;
}

// ------------------------------------------------------------------------------------
// The CUDA thread body: what thread `tid` of `nthreads` (grid-stride) does for elements
// [begin, p.n). The kernel calls it with begin = 0; host tests call it for every thread id
// of a simulated grid, and with begin > 2^31 on pointers shifted back by `begin` elements.
// Vector path requires p.aligned and begin % (16 / sizeof(storage)) == 0.
// ------------------------------------------------------------------------------------
template <class T, int NS, bool HAS_NOISE>
DF_HD void combine_thread(const Params& p, int64_t begin, int64_t tid, int64_t nthreads) {
  using S = typename T::storage;
  constexpr int64_t W = Pack16<S>::kN;
  if (p.aligned && begin % W == 0) {
    const int64_t vend = p.n / W;
    for (int64_t k = begin / W + tid; k < vend; k += nthreads) combine_pack<T, NS, HAS_NOISE>(p, k);
    const int64_t tail = vend * W > begin ? vend * W : begin;
    for (int64_t i = tail + tid; i < p.n; i += nthreads) combine_element<T, NS, HAS_NOISE>(p, i);
  } else {
    for (int64_t i = begin + tid; i < p.n; i += nthreads) combine_element<T, NS, HAS_NOISE>(p, i);
  }
}

// Compile-time dispatch over (dtype, NS, HAS_NOISE): calls f.template operator()<T, NS, HN>().
template <class F>
inline bool dispatch(int dtype, int ns, bool has_noise, F&& f) {
#define DF_CASE_NS(T, N)                                          \
  case N:                                                         \
    if (has_noise) f.template operator()<T, N, true>();           \
    else f.template operator()<T, N, false>();                    \
    return true;
#define DF_CASE_T(T)                                              \
  switch (ns) {                                                   \
    DF_CASE_NS(T, 1) DF_CASE_NS(T, 2) DF_CASE_NS(T, 3)            \
    DF_CASE_NS(T, 4) DF_CASE_NS(T, 5) DF_CASE_NS(T, 6)            \
    default: return false;                                        \
  }
  switch (dtype) {
    case kF32: DF_CASE_T(F32)
    case kF16: DF_CASE_T(F16)
    case kBF16: DF_CASE_T(BF16)
    default: return false;
  }
#undef DF_CASE_T
#undef DF_CASE_NS
}

inline bool ptr_aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

inline int all_aligned16(const Params& p, int ns) {
  if (!ptr_aligned16(p.out)) return 0;
  for (int j = 0; j < ns; ++j)
    if (!ptr_aligned16(p.src[j])) return 0;
  if (p.noise && !ptr_aligned16(p.noise)) return 0;
  return 1;
}

}  // namespace df
