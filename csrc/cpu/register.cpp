// Binds the CPU kernels on tckernels._C as cpu_*. The GIL is released while a kernel runs
// (the Python caller keeps the tensors alive).
#include <pybind11/pybind11.h>

#include "cpu/kernels.h"

namespace py = pybind11;

namespace tck {

void register_cpu(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("cpu_topk_relu", &cpu::topk_relu, release(),
        "values[M,k], indices[M,k] <- top-k of pre[M,N] (+bias[N]) with ReLU; NaN largest, ties to lower index",
        py::arg("pre"), py::arg("bias"), py::arg("values"), py::arg("indices"), py::arg("M"), py::arg("N"),
        py::arg("k"), py::arg("dtype"), py::arg("nthreads"));
  m.def("cpu_relu_select", &cpu::relu_select, release(),
        "values/indices[M,k_max], counts[M] <- entries of pre[M,N] (+bias) above threshold, ascending index",
        py::arg("pre"), py::arg("bias"), py::arg("threshold"), py::arg("threshold_value"), py::arg("values"),
        py::arg("indices"), py::arg("counts"), py::arg("M"), py::arg("N"), py::arg("k_max"), py::arg("dtype"),
        py::arg("nthreads"));
  m.def("cpu_gather_matmul", &cpu::gather_matmul, release(),
        "out[M,D] = sum_j values[m,j] * W[indices[m,j]] (+bias[D])", py::arg("values"), py::arg("indices"),
        py::arg("W"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("k"), py::arg("N"), py::arg("D"),
        py::arg("dtype"), py::arg("nthreads"));
  m.def("cpu_gather_dot", &cpu::gather_dot, release(), "out[M,k] = <G[m], W[indices[m,j]]>", py::arg("G"),
        py::arg("indices"), py::arg("W"), py::arg("out"), py::arg("M"), py::arg("k"), py::arg("N"), py::arg("D"),
        py::arg("dtype"), py::arg("nthreads"));
  m.def("cpu_scatter_matmul", &cpu::scatter_matmul, release(),
        "out[n_rows,D] = sum_{indices[m,j]==n} values[m,j] * G[m]; deterministic (sorted, no atomics)",
        py::arg("values"), py::arg("indices"), py::arg("G"), py::arg("out"), py::arg("M"), py::arg("k"),
        py::arg("n_rows"), py::arg("D"), py::arg("dtype"), py::arg("nthreads"));
}

}  // namespace tck
