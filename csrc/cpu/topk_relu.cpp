// topk_relu on the CPU: per row, the k largest entries of s = pre (+ bias), NaN above every
// number, ties to the lower index; output in descending order (ties by ascending index);
// values = relu(s) rounded to pre's dtype. See tckernels/backends/reference.py.
//
// Each candidate is one unsigned integer whose order is exactly the selection order:
//   key = (order-preserving bits of s) << W | (~index),
// where -0 is folded onto +0 and every NaN onto the largest key, so "beats" is one integer compare.
// k up to N/16 (the usual case): a bounded selection in two vectorised passes over the row (see
// row_bounded), which leaves a few times k candidates. Larger k: all N keys, nth_element.
// Either way the k winners are then sorted by key.
#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#if TCK_HAVE_SSE2
#include <emmintrin.h>
#endif

namespace tck {
namespace cpu {
namespace {

// Candidate keys for float (32-bit order key + 32-bit index) and double (64 + 64).
struct Key32 {
  using key_t = uint64_t;
  static inline uint32_t order(float f) {
    if (f != f) return 0xffffffffu;
    uint32_t b = f == 0.0f ? 0u : f32_bits(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  static inline float value(uint32_t o) {  // the float (NaN for the NaN key) with order key o
    if (o == 0xffffffffu) return std::nanf("");
    return bits_f32((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
  }
  static inline key_t make(float s, int64_t n) {
    return (static_cast<uint64_t>(order(s)) << 32) | (0xffffffffu - static_cast<uint32_t>(n));
  }
  static inline int64_t index_of(key_t key) { return 0xffffffffu - static_cast<uint32_t>(key); }
};

struct Key64 {
  using key_t = unsigned __int128;
  static inline uint64_t order(double f) {
    if (f != f) return ~uint64_t(0);
    uint64_t b = f == 0.0 ? 0u : f64_bits(f);
    const uint64_t top = uint64_t(1) << 63;
    return (b & top) ? ~b : (b | top);
  }
  static inline double value(uint64_t o) {
    if (o == ~uint64_t(0)) return std::nan("");
    const uint64_t top = uint64_t(1) << 63;
    return bits_f64((o & top) ? (o & ~top) : ~o);
  }
  static inline key_t make(double s, int64_t n) {
    return (static_cast<key_t>(order(s)) << 64) | static_cast<key_t>(~static_cast<uint64_t>(n));
  }
  static inline int64_t index_of(key_t key) { return static_cast<int64_t>(~static_cast<uint64_t>(key)); }
};

template <typename C>
struct KeyFor;
template <>
struct KeyFor<float> {
  using type = Key32;
};
template <>
struct KeyFor<double> {
  using type = Key64;
};

// The bounded selection reads x[i] = p[i] + b[i] when kSum, else x[i] = p[i] (b unused).

// Pass 1: the order key of the largest of the B values x[0, B) (NaN counting as largest); B is a
// multiple of kUnit.
constexpr int64_t kUnit = 16;

template <bool kSum>
inline uint32_t block_max_key(const float* p, const float* b, int64_t B) {
#if TCK_HAVE_SSE2
  auto ld = [&](int64_t i) {
    const __m128 x = _mm_loadu_ps(p + i);
    return kSum ? _mm_add_ps(x, _mm_loadu_ps(b + i)) : x;
  };
  __m128 m0 = ld(0), m1 = ld(4), m2 = ld(8), m3 = ld(12);
  __m128 nan = _mm_or_ps(_mm_cmpunord_ps(m0, m1), _mm_cmpunord_ps(m2, m3));  // unordered: either is NaN
  for (int64_t q = kUnit; q < B; q += kUnit) {
    const __m128 x0 = ld(q), x1 = ld(q + 4), x2 = ld(q + 8), x3 = ld(q + 12);
    nan = _mm_or_ps(nan, _mm_or_ps(_mm_cmpunord_ps(x0, x1), _mm_cmpunord_ps(x2, x3)));
    m0 = _mm_max_ps(m0, x0);
    m1 = _mm_max_ps(m1, x1);
    m2 = _mm_max_ps(m2, x2);
    m3 = _mm_max_ps(m3, x3);
  }
  if (_mm_movemask_ps(nan)) return 0xffffffffu;
  __m128 mx = _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3));
  mx = _mm_max_ps(mx, _mm_shuffle_ps(mx, mx, _MM_SHUFFLE(1, 0, 3, 2)));
  mx = _mm_max_ps(mx, _mm_shuffle_ps(mx, mx, _MM_SHUFFLE(2, 3, 0, 1)));
  return Key32::order(_mm_cvtss_f32(mx));
#else
  uint32_t best = 0;
  for (int64_t i = 0; i < B; ++i) best = std::max(best, Key32::order(kSum ? p[i] + b[i] : p[i]));
  return best;
#endif
}

template <bool kSum>
inline uint64_t block_max_key(const double* p, const double* b, int64_t B) {
#if TCK_HAVE_SSE2
  auto ld = [&](int64_t i) {
    const __m128d x = _mm_loadu_pd(p + i);
    return kSum ? _mm_add_pd(x, _mm_loadu_pd(b + i)) : x;
  };
  __m128d m0 = ld(0), m1 = ld(2), nan = _mm_cmpunord_pd(m0, m1);
  for (int64_t q = 4; q < B; q += 4) {
    const __m128d x0 = ld(q), x1 = ld(q + 2);
    nan = _mm_or_pd(nan, _mm_cmpunord_pd(x0, x1));
    m0 = _mm_max_pd(m0, x0);
    m1 = _mm_max_pd(m1, x1);
  }
  if (_mm_movemask_pd(nan)) return ~uint64_t(0);
  __m128d mx = _mm_max_pd(m0, m1);
  mx = _mm_max_pd(mx, _mm_shuffle_pd(mx, mx, 1));
  return Key64::order(_mm_cvtsd_f64(mx));
#else
  uint64_t best = 0;
  for (int64_t i = 0; i < B; ++i) best = std::max(best, Key64::order(kSum ? p[i] + b[i] : p[i]));
  return best;
#endif
}

// Pass 2: appends the key of every x[i], i < len, with !(x[i] < t) (so NaN too), index n0 + i.
template <bool kSum, typename KS, typename C, typename K>
inline int64_t collect(const C* p, const C* b, int64_t n0, int64_t len, C t, K* out) {
  int64_t count = 0, i = 0;
#if TCK_HAVE_SSE2
  if (std::is_same<C, float>::value) {
    const float* pf = reinterpret_cast<const float*>(p);
    const float* bf = reinterpret_cast<const float*>(b);
    const __m128 tv = _mm_set1_ps(static_cast<float>(t));
    for (; i + 4 <= len; i += 4) {
      __m128 x = _mm_loadu_ps(pf + i);
      if (kSum) x = _mm_add_ps(x, _mm_loadu_ps(bf + i));
      int mask = _mm_movemask_ps(_mm_cmpnlt_ps(x, tv));
      while (mask) {
        const int l = __builtin_ctz(mask);
        out[count++] = KS::make(kSum ? C(p[i + l] + b[i + l]) : p[i + l], n0 + i + l);
        mask &= mask - 1;
      }
    }
  }
#endif
  for (; i < len; ++i) {
    const C x = kSum ? C(p[i] + b[i]) : p[i];
    if (!(x < t)) out[count++] = KS::make(x, n0 + i);
  }
  return count;
}

// Min-heap of k entries (root = smallest): replace the root by x and restore the heap.
template <typename O>
inline void replace_min(O* h, int64_t k, O x) {
  int64_t i = 0;
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= k) break;
    if (c + 1 < k && h[c + 1] < h[c]) ++c;
    if (!(h[c] < x)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = x;
}

// The k-th largest of v[0, n) (1 <= k <= n), with a k-entry min-heap in h: one compare per
// entry once the heap holds large values.
template <typename O>
inline O kth_largest(const O* v, int64_t n, int64_t k, O* h) {
  std::copy(v, v + k, h);
  std::make_heap(h, h + k, std::greater<O>());
  for (int64_t i = k; i < n; ++i)
    if (v[i] > h[0]) replace_min(h, k, v[i]);
  return h[0];
}

template <typename T>
struct TopkRows {
  using C = typename Cvt<T>::acc_t;
  using KS = typename KeyFor<C>::type;
  using K = typename KS::key_t;                  // candidate key (order bits, then ~index)
  using O = decltype(KS::order(C(0)));           // order key of a value alone

  const T* pre;
  const T* bias;  // may be null
  T* values;
  int64_t* indices;
  int64_t N, k;

  // Per-thread scratch.
  struct Scratch {
    std::vector<C> s;      // the row's s values, when they are not the input row itself
    std::vector<O> bmax;   // block maxima (bounded selection)
    std::vector<K> cand;   // candidate keys
  };

  TCK_INLINE C s_at(const T* row, int64_t n) const {
    // No bias: s is the converted input itself (no "+ 0", which would turn -0 into +0).
    return bias ? C(Cvt<T>::load(row[n]) + Cvt<T>::load(bias[n])) : C(Cvt<T>::load(row[n]));
  }

  // The row's s values: the row itself when no conversion or bias is needed, else buf.
  TCK_INLINE const C* s_row(const T* row, C* buf) const {
    if (std::is_same<T, C>::value && !bias) return reinterpret_cast<const C*>(row);
    if (bias) {
      for (int64_t n = 0; n < N; ++n) buf[n] = Cvt<T>::load(row[n]) + Cvt<T>::load(bias[n]);
    } else {
      for (int64_t n = 0; n < N; ++n) buf[n] = Cvt<T>::load(row[n]);
    }
    return buf;
  }

  // The k best of cand[0, count) in selection order to the outputs.
  TCK_INLINE void finish(const T* row, K* cand, int64_t count, T* vout, int64_t* iout) const {
    if (count > k) std::nth_element(cand, cand + (k - 1), cand + count, std::greater<K>());
    std::sort(cand, cand + k, std::greater<K>());
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = KS::index_of(cand[j]);
      const C s = s_at(row, n);
      vout[j] = Cvt<T>::store(s < C(0) ? C(0) : s);  // relu keeping NaN and -0 like torch.relu
      iout[j] = n;
    }
  }

  // Bounded selection (k <= number of blocks). Pass 1: the maximum of every block of B values;
  // t = the k-th largest of these maxima is a lower bound of the row's k-th largest value (k
  // distinct blocks hold a value >= t). Pass 2 keeps, from the blocks whose maximum reaches t,
  // the values not below t (in float comparison, so -0 and +0 stay tied, and NaN is kept):
  // usually a few times k candidates, never fewer than k, and all of the true top k among them.
  // Exact selection among the candidates ends the job.
  template <bool kSum>
  TCK_INLINE void row_bounded(const C* p, const C* bp, const T* row, int64_t B, Scratch& w, T* vout,
                              int64_t* iout) const {
    const int64_t full = N / B, nb = (N + B - 1) / B;
    O* bmax = w.bmax.data();
    for (int64_t b = 0; b < full; ++b) bmax[b] = block_max_key<kSum>(p + b * B, bp + b * B, B);
    if (nb > full) {
      O best = 0;
      for (int64_t n = full * B; n < N; ++n) best = std::max(best, KS::order(kSum ? C(p[n] + bp[n]) : p[n]));
      bmax[full] = best;
    }
    const O bound = kth_largest(bmax, nb, k, bmax + nb);
    const C t = KS::value(bound);
    K* cand = w.cand.data();
    int64_t count = 0;
    for (int64_t b = 0; b < nb; ++b) {
      if (bmax[b] < bound) continue;
      const int64_t n0 = b * B;
      count += collect<kSum, KS>(p + n0, bp + n0, n0, std::min(B, N - n0), t, cand + count);
    }
    finish(row, cand, count, vout, iout);
  }

  // Plain selection over all N keys (k close to N).
  TCK_INLINE void row_select(const C* s, const T* row, Scratch& w, T* vout, int64_t* iout) const {
    K* cand = w.cand.data();
    for (int64_t n = 0; n < N; ++n) cand[n] = KS::make(s[n], n);
    finish(row, cand, N, vout, iout);
  }

  // Block size of the bounded selection: the largest of 128, 64, 32, 16 leaving at least 4k
  // blocks, else 16 if that leaves at least k blocks; 0 when k is too close to N (plain selection).
  int64_t block_size() const {
    for (int64_t B = 128; B >= kUnit; B /= 2)
      if (N / B >= 4 * k) return B;
    return (N + kUnit - 1) / kUnit >= k ? kUnit : 0;
  }

  TCK_INLINE void run(int64_t lo, int64_t hi) const {
    const int64_t B = block_size();
    const bool in_place = std::is_same<T, C>::value;  // float/double: read pre and bias directly
    Scratch w;
    if (!in_place || (bias && !B)) w.s.resize(static_cast<size_t>(N));  // see s_row
    if (B) w.bmax.resize(static_cast<size_t>(2 * ((N + B - 1) / B)));
    w.cand.resize(static_cast<size_t>(N));
    for (int64_t m = lo; m < hi; ++m) {
      const T* row = pre + m * N;
      T* vout = values + m * k;
      int64_t* iout = indices + m * k;
      if (B && in_place && bias) {
        row_bounded<true>(reinterpret_cast<const C*>(row), reinterpret_cast<const C*>(bias), row, B, w, vout, iout);
        continue;
      }
      const C* s = s_row(row, w.s.data());
      if (B)
        row_bounded<false>(s, s, row, B, w, vout, iout);
      else
        row_select(s, row, w, vout, iout);
    }
  }
};

// The per-thread entry point, compiled for baseline x86-64 and AVX2 (see simd.h).
template <typename T>
TCK_CPU_CLONES void topk_rows(const TopkRows<T>* job, int64_t lo, int64_t hi) {
  job->run(lo, hi);
}

}  // namespace

void topk_relu(uintptr_t pre, uintptr_t bias, uintptr_t values, uintptr_t indices, int64_t M, int64_t N,
               int64_t k, int dtype, int nthreads) {
  const char* fn = "cpu_topk_relu";
  require(M >= 0 && N >= 0, fn, "M and N must be >= 0");
  require(N <= 0xffffffffLL, fn, "N must be < 2^32");
  require(k >= 0 && k <= N, fn, "k must satisfy 0 <= k <= N (got k=" + std::to_string(k) +
                                    ", N=" + std::to_string(N) + ")");
  if (M == 0 || k == 0) return;
  require(pre != 0 && values != 0 && indices != 0, fn, "null pointer");
  dispatch_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    TopkRows<T> job{as_ptr<const T>(pre), as_ptr<const T>(bias), as_ptr<T>(values), as_ptr<int64_t>(indices), N, k};
    const int nt = threads_for(M * N, nthreads, int64_t(1) << 16);
    parallel_for(0, M, nt, [&](int, int64_t lo, int64_t hi) { topk_rows<T>(&job, lo, hi); });
  });
}

}  // namespace cpu
}  // namespace tck
