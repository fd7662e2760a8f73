// Binds the CUDA kernels on tckernels._C as cuda_*. Every function only enqueues work on the given
// stream (no allocation, no synchronisation); the GIL is released while it does (the Python caller
// keeps the tensors alive). Python allocates every output and workspace.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/ops.h"

namespace py = pybind11;

namespace tck {

void register_cuda(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("cuda_topk_relu", &cuda::topk_relu, release(),
        "values[M,k], indices[M,k] <- top-k of f32(pre[M,N]) + f32(bias[N]) per row with ReLU; NaN largest, "
        "ties to the lower index, descending order",
        py::arg("pre"), py::arg("bias"), py::arg("values"), py::arg("indices"), py::arg("M"), py::arg("N"),
        py::arg("k"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cuda_topk_max_k", &cuda::topk_max_k, "largest k cuda_topk_relu accepts");
  m.def("cuda_gather_matmul", &cuda::gather_matmul, release(),
        "out[M,D] = sum_j values[m,j] * W[indices[m,j]] (+bias[D])", py::arg("values"), py::arg("indices"),
        py::arg("W"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("k"), py::arg("N"), py::arg("D"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cuda_gather_dot", &cuda::gather_dot, release(), "out[M,k] = <G[m], W[indices[m,j]]>", py::arg("G"),
        py::arg("indices"), py::arg("W"), py::arg("out"), py::arg("M"), py::arg("k"), py::arg("N"), py::arg("D"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cuda_scatter_matmul_atomic", &cuda::scatter_matmul_atomic, release(),
        "acc[n_rows,D] (float32, zeroed by the caller) += values[m,j] * G[m] at row indices[m,j] (atomics)",
        py::arg("values"), py::arg("indices"), py::arg("G"), py::arg("acc"), py::arg("M"), py::arg("k"),
        py::arg("n_rows"), py::arg("D"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cuda_cast_from_f32", &cuda::cast_from_f32, release(), "out[count] (dtype) <- acc[count] (float32)",
        py::arg("acc"), py::arg("out"), py::arg("count"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cuda_scatter_matmul_det_workspace_bytes", &cuda::scatter_matmul_det_workspace_bytes, release(),
        "bytes of workspace cuda_scatter_matmul_deterministic needs", py::arg("pairs"), py::arg("n_rows"),
        py::arg("device"));
  m.def("cuda_scatter_matmul_deterministic", &cuda::scatter_matmul_deterministic, release(),
        "out[n_rows,D] = sum_{indices[m,j]==n} values[m,j] * G[m]; sorted by feature, no atomics, bit-identical "
        "run to run",
        py::arg("values"), py::arg("indices"), py::arg("G"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("M"), py::arg("k"), py::arg("n_rows"), py::arg("D"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
  py::tuple archs = py::cast(cuda::compiled_archs());
  m.attr("cuda_archs") = archs;
}

}  // namespace tck
