// What this build of the CUDA kernels carries.
#include <vector>

#include "cuda/ops.h"

namespace tck {
namespace cuda {

std::vector<int> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines __CUDA_ARCH_LIST__ as e.g. 800,900 (every -arch/-gencode virtual arch).
  static const int list[] = {__CUDA_ARCH_LIST__};
  std::vector<int> out;
  for (int a : list) out.push_back(a / 10);
  return out;
#else
  return {};
#endif
}

}  // namespace cuda
}  // namespace tck
