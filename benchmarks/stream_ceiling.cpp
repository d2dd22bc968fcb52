// Single-core ceiling for the order-3 Combine (4 reads + 1 write) on [4,4,128,128] fp32 (1 MiB per
// tensor), independent of deis_fast: the same loop with SSE / SSE + non-temporal stores / AVX2 /
// AVX2 + software prefetch / AVX-512, and memcpy of one tensor for scale. Between repetitions an
// 8 MiB buffer is touched so the operands come from L3, as they do after a network call.
// Issue 3 asks whether a faster kernel could close the gap to ">= 20x DEISMultistepScheduler.step":
// if every variant lands at the same GB/s, the step is bound by the cache hierarchy, not the code.
//
//   g++ -O3 -o /tmp/stream_ceiling benchmarks/stream_ceiling.cpp && /tmp/stream_ceiling
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr long kN = 4L * 4 * 128 * 128;
constexpr int kNS = 4;

__attribute__((noinline)) void sse(float* out, float* const* s, const float* c, bool nt) {
  for (long i = 0; i < kN; i += 4) {
    __m128 a = _mm_mul_ps(_mm_set1_ps(c[0]), _mm_load_ps(s[0] + i));
    for (int j = 1; j < kNS; ++j) a = _mm_add_ps(a, _mm_mul_ps(_mm_set1_ps(c[j]), _mm_load_ps(s[j] + i)));
    if (nt) _mm_stream_ps(out + i, a); else _mm_store_ps(out + i, a);
  }
}

template <int PREFETCH>
__attribute__((noinline, target("avx2,fma"))) void avx2(float* out, float* const* s, const float* c) {
  for (long i = 0; i < kN; i += 8) {
    if (PREFETCH && (i & 15) == 0)
      for (int j = 0; j < kNS; ++j) _mm_prefetch(reinterpret_cast<const char*>(s[j] + i + PREFETCH), _MM_HINT_T0);
    __m256 a = _mm256_mul_ps(_mm256_set1_ps(c[0]), _mm256_load_ps(s[0] + i));
    for (int j = 1; j < kNS; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(c[j]), _mm256_load_ps(s[j] + i), a);
    _mm256_store_ps(out + i, a);
  }
}

__attribute__((noinline, target("avx512f"))) void avx512(float* out, float* const* s, const float* c) {
  for (long i = 0; i < kN; i += 16) {
    __m512 a = _mm512_mul_ps(_mm512_set1_ps(c[0]), _mm512_load_ps(s[0] + i));
    for (int j = 1; j < kNS; ++j) a = _mm512_fmadd_ps(_mm512_set1_ps(c[j]), _mm512_load_ps(s[j] + i), a);
    _mm512_store_ps(out + i, a);
  }
}

}  // namespace

int main() {
  float* s[kNS];
  for (auto& p : s) {
    p = static_cast<float*>(std::aligned_alloc(64, kN * 4));
    for (long i = 0; i < kN; ++i) p[i] = 1e-6f * static_cast<float>(i % 1000);
  }
  float* out = static_cast<float*>(std::aligned_alloc(64, kN * 4));
  std::memset(out, 0, kN * 4);
  const long flush_n = 8L << 20;
  char* flush = static_cast<char*>(std::malloc(flush_n));
  std::memset(flush, 1, flush_n);
  const float c[kNS] = {0.9f, 0.1f, -0.2f, 0.05f};
  const bool avx512_ok = __builtin_cpu_supports("avx512f"), avx2_ok = __builtin_cpu_supports("avx2");
  std::printf("best of 300, operands in L3; GB/s counts the bytes each variant must move\n");
  auto bench = [&](const char* name, int tensors, auto f) {
    double best = 1e30;
    for (int r = 0; r < 300; ++r) {
      for (long i = 0; i < flush_n; i += 64) flush[i]++;
      auto t0 = std::chrono::steady_clock::now();
      f();
      auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::printf("%-22s %8.1f us  %6.1f GB/s\n", name, best, tensors * kN * 4.0 / best / 1e3);
  };
  bench("combine sse", 5, [&] { sse(out, s, c, false); });
  bench("combine sse+stream", 5, [&] { sse(out, s, c, true); });
  if (avx2_ok) {
    bench("combine avx2", 5, [&] { avx2<0>(out, s, c); });
    bench("combine avx2+prefetch", 5, [&] { avx2<1024>(out, s, c); });
  }
  if (avx512_ok) bench("combine avx512", 5, [&] { avx512(out, s, c); });
  bench("memcpy (1 tensor)", 2, [&] { std::memcpy(out, s[0], kN * 4); });
  std::printf("checksum %g\n", static_cast<double>(out[12345]));
  return 0;
}
