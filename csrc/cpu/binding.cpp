// Python binding of linrec's CPU kernels (JIT-built by linrec/_cpp.py). The Python launchers
// prepare dtypes and layouts; the kernels check what they rely on and allocate the outputs.

#include <torch/extension.h>

#include <vector>

namespace linrec_cpu {
at::Tensor diagonal_forward(const at::Tensor& a, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& cu, bool reverse);
std::vector<at::Tensor> diagonal_backward(const at::Tensor& a, const at::Tensor& h, const at::Tensor& gh,
                                          const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                          bool reverse, bool accumulate);
at::Tensor block_diagonal_forward(const at::Tensor& A, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                                  const c10::optional<at::Tensor>& cu, bool reverse);
std::vector<at::Tensor> block_diagonal_backward(const at::Tensor& A, const at::Tensor& h, const at::Tensor& gh,
                                                const c10::optional<at::Tensor>& h0,
                                                const c10::optional<at::Tensor>& cu, bool reverse, bool accumulate);
}  // namespace linrec_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "linrec's CPU kernels: diagonal and block-diagonal scans (forward and fused backward)";
  m.def("diagonal_forward", &linrec_cpu::diagonal_forward, "diagonal scan forward", py::arg("a"), py::arg("x"),
        py::arg("initial_state"), py::arg("cu_seqlens"), py::arg("reverse"));
  m.def("diagonal_backward", &linrec_cpu::diagonal_backward, "diagonal scan backward", py::arg("a"), py::arg("h"),
        py::arg("grad_h"), py::arg("initial_state"), py::arg("cu_seqlens"), py::arg("reverse"),
        py::arg("accumulate"));
  m.def("block_diagonal_forward", &linrec_cpu::block_diagonal_forward, "block-diagonal scan forward", py::arg("A"),
        py::arg("x"), py::arg("initial_state"), py::arg("cu_seqlens"), py::arg("reverse"));
  m.def("block_diagonal_backward", &linrec_cpu::block_diagonal_backward, "block-diagonal scan backward",
        py::arg("A"), py::arg("h"), py::arg("grad_h"), py::arg("initial_state"), py::arg("cu_seqlens"),
        py::arg("reverse"), py::arg("accumulate"));
}
