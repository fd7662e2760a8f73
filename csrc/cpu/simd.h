// Row primitives of the CPU kernels, written with GCC/Clang vector extensions (one 32-byte
// vector: 8 floats or 4 doubles) so the code is vectorised whatever the compiler's
// auto-vectoriser decides, with a plain C++ fallback that computes exactly the same sums.
//
// TCK_CPU_CLONES marks the hot per-thread functions: with GCC >= 11 on x86-64 Linux they are
// compiled twice (baseline x86-64 and x86-64-v3, i.e. AVX2 + FMA) and the loader picks the
// version for the running CPU, so one binary runs everywhere and uses AVX2 where there is one.
// The choice is made once per process: results are the same run to run and for any thread
// count (the FMA version may differ in the last bits from the baseline one on another machine).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/common.h"

// TCK_SCALAR_ONLY (a build-time define, for testing) turns off the clones, the vector
// extensions and the SSE2 intrinsics, leaving the portable C++ paths other targets use.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) && \
    !defined(TCK_NO_CLONES) && !defined(TCK_SCALAR_ONLY)
#define TCK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define TCK_CPU_CLONES
#endif

#if (defined(__GNUC__) || defined(__clang__)) && !defined(TCK_SCALAR_ONLY)
#define TCK_HAVE_VEC 1
#else
#define TCK_HAVE_VEC 0
#endif

#if defined(__SSE2__) && !defined(TCK_SCALAR_ONLY)
#define TCK_HAVE_SSE2 1
#else
#define TCK_HAVE_SSE2 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TCK_INLINE inline __attribute__((always_inline))
#else
#define TCK_INLINE inline
#endif

namespace tck {
namespace cpu {

// Elements of C per 32-byte vector; the dot products keep this many partial sums per row.
template <typename C>
struct Lanes {
  static constexpr int64_t n = 32 / sizeof(C);
};

#if TCK_HAVE_VEC
template <typename C>
struct Vec {
  typedef C type __attribute__((vector_size(32)));
};
// (vectors passed by reference: no 32-byte vector crosses a function boundary of the baseline ABI)
template <typename V, typename C>
TCK_INLINE void vload(V& v, const C* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename C>
TCK_INLINE void vstore(C* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
#endif

// The row of D values at src in the accumulation type: src itself when T is C, otherwise
// converted into buf (D elements).
template <typename T, typename C = typename Cvt<T>::acc_t>
TCK_INLINE const C* acc_row(const T* src, C* buf, int64_t D) {
  if (std::is_same<T, C>::value) return reinterpret_cast<const C*>(src);
  for (int64_t d = 0; d < D; ++d) buf[d] = Cvt<T>::load(src[d]);
  return buf;
}

// acc[d] = acc[d] + a[0]*x[0][d] + ... + a[R-1]*x[R-1][d], the terms added one after the other
// (the same sums as R calls with one row each). When `first`, the sum starts from 0 instead of
// acc[d] if zero_start (like index_add into zeros), or from the first term (like a matmul, so a
// lone -0 term stays -0).
template <int R, typename C>
TCK_INLINE void accum_rows(C* __restrict acc, const C* const* x, const C* a, int64_t D, bool first,
                           bool zero_start) {
  const bool from_term = first && !zero_start;
  const int r0 = from_term ? 1 : 0;
  int64_t d = 0;
#if TCK_HAVE_VEC
  typedef typename Vec<C>::type V;
  constexpr int64_t n = Lanes<C>::n;
  V av[R];
  for (int r = 0; r < R; ++r) av[r] = V{} + a[r];
  for (; d + n <= D; d += n) {
    V s = V{}, xv;
    if (from_term) {
      vload(xv, x[0] + d);
      s = av[0] * xv;
    } else if (!first) {
      vload(s, acc + d);
    }
    for (int r = r0; r < R; ++r) {
      vload(xv, x[r] + d);
      s = s + av[r] * xv;
    }
    vstore(acc + d, s);
  }
#endif
  for (; d < D; ++d) {
    C s = from_term ? C(a[0] * x[0][d]) : first ? C(0) : acc[d];
    for (int r = r0; r < R; ++r) s = s + a[r] * x[r][d];
    acc[d] = s;
  }
}

// acc[0..D) = sum over i < count of coef_i * row_i, added in i order (starting from 0 when
// zero_start, else from the first term; 0 when count is 0), where entry(i, row, coef) gives row
// i (T storage, D elements) and its coefficient. Rows are read eight at a time (independent
// memory streams). conv: scratch of 8*D elements when T is not C.
template <typename T, typename C, typename Entry>
TCK_INLINE void sum_rows(C* __restrict acc, int64_t count, int64_t D, C* conv, bool zero_start, Entry&& entry) {
  constexpr int kMax = 8;
  const bool convert = !std::is_same<T, C>::value;
  if (count == 0) {
    for (int64_t d = 0; d < D; ++d) acc[d] = C(0);
    return;
  }
  const C* x[kMax];
  C a[kMax];
  bool first = true;
  for (int64_t i = 0; i < count;) {
    const int64_t left = count - i;
    const int R = left >= 8 ? 8 : left >= 4 ? 4 : static_cast<int>(left);
    for (int r = 0; r < R; ++r) {
      const T* row;
      entry(i + r, row, a[r]);
      x[r] = acc_row<T>(row, conv + (convert ? r * D : 0), D);
    }
    switch (R) {
      case 8: accum_rows<8, C>(acc, x, a, D, first, zero_start); break;
      case 4: accum_rows<4, C>(acc, x, a, D, first, zero_start); break;
      case 3: accum_rows<3, C>(acc, x, a, D, first, zero_start); break;
      case 2: accum_rows<2, C>(acc, x, a, D, first, zero_start); break;
      default: accum_rows<1, C>(acc, x, a, D, first, zero_start); break;
    }
    first = false;
    i += R;
  }
}

// out[r] = <g, w[r]> for r < R. Partial sums per lane (d mod n), added in a fixed tree, so the
// result of one row does not depend on R or on which rows it is computed with.
template <int R, typename C>
TCK_INLINE void dot_rows(const C* __restrict g, const C* const* w, int64_t D, C* out) {
  constexpr int64_t n = Lanes<C>::n;
  C lane[R][n];
  int64_t d = 0;
#if TCK_HAVE_VEC
  typedef typename Vec<C>::type V;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (; d + n <= D; d += n) {
    V gv, wv;
    vload(gv, g + d);
    for (int r = 0; r < R; ++r) {
      vload(wv, w[r] + d);
      acc[r] = acc[r] + gv * wv;
    }
  }
  for (int r = 0; r < R; ++r) vstore(lane[r], acc[r]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < n; ++l) lane[r][l] = C(0);
  for (; d + n <= D; d += n)
    for (int r = 0; r < R; ++r)
      for (int64_t l = 0; l < n; ++l) lane[r][l] = lane[r][l] + g[d + l] * w[r][d + l];
#endif
  for (int r = 0; r < R; ++r) {
    for (int64_t l = 0; d + l < D; ++l) lane[r][l] = lane[r][l] + g[d + l] * w[r][d + l];
    for (int64_t width = n / 2; width >= 1; width /= 2)
      for (int64_t l = 0; l < width; ++l) lane[r][l] = lane[r][l] + lane[r][l + width];
    out[r] = lane[r][0];
  }
}

}  // namespace cpu
}  // namespace tck
