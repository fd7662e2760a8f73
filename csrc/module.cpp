// The tckernels._C module. Each backend registers its functions from its own file;
// this file only assembles them and reports what was built.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace tck {
void register_cpu(py::module_& m);
#ifdef TCK_WITH_CUDA
void register_cuda(py::module_& m);
#endif
}  // namespace tck

PYBIND11_MODULE(_C, m) {
  m.doc() = "tckernels native kernels (torch-ABI-free: raw pointers in, nothing allocated here)";
  tck::register_cpu(m);
#ifdef TCK_WITH_CUDA
  m.attr("with_cuda") = true;
  tck::register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
