// Python binding of linrec's CPU kernels (JIT-built by linrec/_cpp.py). The Python launchers
// prepare dtypes and layouts; the kernels check what they rely on and allocate the outputs.

#include <torch/extension.h>

#include <vector>

#include "common.h"

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
std::vector<at::Tensor> householder_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& beta, const c10::optional<at::Tensor>& log_gate,
                                            const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                            double scale);
std::vector<at::Tensor> householder_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& beta, const c10::optional<at::Tensor>& log_gate,
                                             const c10::optional<at::Tensor>& h0, const at::Tensor& grad_o,
                                             const c10::optional<at::Tensor>& grad_final,
                                             const c10::optional<at::Tensor>& cu, double scale);
}  // namespace linrec_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "linrec's CPU kernels: diagonal, block-diagonal and Householder scans (forward and backward)";
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
  m.def("householder_forward", &linrec_cpu::householder_forward, "Householder scan forward, step by step",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("log_gate"), py::arg("initial_state"),
        py::arg("cu_seqlens"), py::arg("scale"));
  m.def("householder_backward", &linrec_cpu::householder_backward, "Householder scan backward, step by step",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("log_gate"), py::arg("initial_state"),
        py::arg("grad_o"), py::arg("grad_final"), py::arg("cu_seqlens"), py::arg("scale"));
  // The output cache (common.h): what it holds, emptying it, its limit.
  m.def("output_cache_info", [] {
    const auto i = linrec_cpu::OutputCache::get().info();
    return py::dict(py::arg("cached_bytes") = i.cached_bytes, py::arg("cached_blocks") = i.cached_blocks,
                    py::arg("limit_bytes") = i.limit_bytes, py::arg("hits") = i.hits, py::arg("misses") = i.misses);
  }, "the output cache: cached bytes and blocks, limit in bytes, hits and misses so far");
  m.def("empty_output_cache", [] { linrec_cpu::OutputCache::get().release(); },
        "unmaps every cached output block (outputs in use stay)");
  m.def("set_output_cache_limit", [](size_t bytes) { return linrec_cpu::OutputCache::get().set_limit(bytes); },
        "sets the output cache's limit in bytes (0: no caching); returns the previous limit", py::arg("bytes"));
}
