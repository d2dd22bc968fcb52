// CPU kernel of the combine op: OpenMP over chunks, the formula from combine.h in a simd loop.
#include "combine_api.h"

#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace df {
namespace {

constexpr int64_t kChunk = 16384;        // elements per task (64 KiB of fp32 per stream)
constexpr int64_t kMinParallel = 65536;  // below this, stay on the calling thread

template <class T, int NS, bool HAS_NOISE>
void run_range(const Params& p, int64_t b, int64_t e) {  // NOLINT(b modified)
  using S = typename T::storage;
  const S* s[NS];
  for (int j = 0; j < NS; ++j) s[j] = static_cast<const S*>(p.src[j]);
  const S* z = static_cast<const S*>(p.noise);
  S* out = static_cast<S*>(p.out);
  const Coefs c = p.coefs;
#if defined(__SSE2__)
  // fp32 with 16-byte aligned pointers: same formula on 4 lanes, non-temporal stores (the output
  // is not re-read soon; skips the read-for-ownership of `out` and saves ~1/6 of the traffic).
  if constexpr (std::is_same_v<T, F32>) {
    if (p.aligned && (b & 3) == 0) {
      const int64_t e4 = b + ((e - b) & ~int64_t(3));
      for (int64_t i = b; i < e4; i += 4) {
        __m128 acc = _mm_mul_ps(_mm_set1_ps(c.c[0]), _mm_load_ps(s[0] + i));
        for (int j = 1; j < NS; ++j) acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(c.c[j]), _mm_load_ps(s[j] + i)));
        if (HAS_NOISE) acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(c.c[6]), _mm_load_ps(z + i)));
        _mm_stream_ps(out + i, acc);
      }
      _mm_sfence();
      b = e4;
    }
  }
#endif
  // Each iteration reads element i of every source before writing out[i]; iterations are
  // independent even when out aliases a source, so `omp simd` is valid.
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    float v[NS];
    for (int j = 0; j < NS; ++j) v[j] = T::load(s[j][i]);
    const float zz = HAS_NOISE ? T::load(z[i]) : 0.0f;
    out[i] = T::store(combine_value<NS, HAS_NOISE>(v, zz, c));
  }
}

template <class T, int NS, bool HAS_NOISE>
void run(const Params& p, int nthreads) {
  const int64_t n = p.n;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#if defined(_OPENMP)
  if (nthreads > 1 && n >= kMinParallel) {
    const int nt = (int)(nchunks < nthreads ? nchunks : nthreads);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t k = 0; k < nchunks; ++k) {
      const int64_t b = k * kChunk;
      run_range<T, NS, HAS_NOISE>(p, b, b + kChunk < n ? b + kChunk : n);
    }
    return;
  }
#endif
  (void)nchunks;
  (void)nthreads;
  run_range<T, NS, HAS_NOISE>(p, 0, n);
}

}  // namespace

bool combine_cpu(const Params& p, int ns, bool has_noise, int dtype, int nthreads) {
  if (p.n <= 0) return dtype >= kF32 && dtype <= kBF16 && ns >= 1 && ns <= kMaxSources;
  return dispatch(dtype, ns, has_noise,
                  [&]<class T, int NS, bool HN>() { run<T, NS, HN>(p, nthreads); });
}

}  // namespace df
