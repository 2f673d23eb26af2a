// Thin PyTorch binding of the CUDA diagonal scan: checks tensors, allocates the look-back
// workspace from PyTorch's caching allocator and launches on the current stream. The Python
// launcher (linrec/_cuda.py) prepares dtypes and layouts and allocates the outputs.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "diagonal_scan.h"

namespace {

linrec::ScanDtype scan_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return linrec::ScanDtype::kFloat32;
    case at::kBFloat16: return linrec::ScanDtype::kBFloat16;
    case at::kHalf: return linrec::ScanDtype::kFloat16;
    case at::kComplexFloat: return linrec::ScanDtype::kComplex64;
    default: break;
  }
  TORCH_CHECK(false, "linrec CUDA diagonal scan: unsupported dtype ", t.scalar_type(),
              " (float32, bfloat16, float16 and complex64 are supported)");
}

at::ScalarType acc_type_of(const at::Tensor& t) { return t.is_complex() ? at::kComplexFloat : at::kFloat; }

void check_cuda(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
}

void check_dense(const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape,
                 const at::Tensor& ref) {
  check_cuda(name, t, ref);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// a: (B, T, D) view (broadcast strides allowed); x: (B, T, D) contiguous, forward input or dL/dh;
// out: (B, T, D) contiguous, x's dtype. Backward (h given): h like x; grad_a (B, T, D) and
// grad_h0 (N, D) contiguous in the accumulation dtype, grad_h0 zero-filled.
void diagonal_scan(const at::Tensor& a, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                   const c10::optional<at::Tensor>& cu_seqlens, at::Tensor& out,
                   const c10::optional<at::Tensor>& h, const c10::optional<at::Tensor>& grad_a,
                   const c10::optional<at::Tensor>& grad_h0, bool reverse, bool backward) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, T, D), got ", x.sizes());
  const linrec::ScanDtype dtype = scan_dtype_of(x);
  const at::ScalarType acc = acc_type_of(x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_dense("x", x, x.scalar_type(), x.sizes(), x);
  check_dense("out", out, x.scalar_type(), x.sizes(), x);
  check_cuda("a", a, x);
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "a must have x's dtype ", x.scalar_type(), ", got ",
              a.scalar_type());
  TORCH_CHECK(a.sizes() == x.sizes(), "a must be expanded to x's shape ", x.sizes(), ", got ", a.sizes());

  int64_t N = B;
  linrec::DiagonalScanParams p;
  if (cu_seqlens.has_value()) {
    check_cuda("cu_seqlens", *cu_seqlens, x);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kLong && cu_seqlens->dim() == 1 && cu_seqlens->is_contiguous(),
                "cu_seqlens must be a contiguous 1-D int64 tensor");
    TORCH_CHECK(B == 1, "with cu_seqlens the batch must be packed into B = 1, got B = ", B);
    N = cu_seqlens->numel() - 1;
    TORCH_CHECK(N >= 1, "cu_seqlens must hold N + 1 >= 2 offsets");
    p.cu_seqlens = cu_seqlens->data_ptr<int64_t>();
  }
  if (h0.has_value()) {
    check_dense("initial_state", *h0, acc, {N, D}, x);
    p.h0 = h0->data_ptr();
  }
  if (backward) {
    TORCH_CHECK(h.has_value() && grad_a.has_value() && grad_h0.has_value(),
                "the backward needs h, grad_a and grad_h0");
    check_dense("h", *h, x.scalar_type(), x.sizes(), x);
    check_dense("grad_a", *grad_a, acc, x.sizes(), x);
    check_dense("grad_h0", *grad_h0, acc, {N, D}, x);
    p.h = h->data_ptr();
    p.grad_a = grad_a->data_ptr();
    p.grad_h0 = grad_h0->data_ptr();
  }

  p.dtype = dtype;
  p.batch = B;
  p.seqlen = T;
  p.dim = D;
  p.num_seqs = N;
  p.a = a.data_ptr();
  p.a_stride_b = a.stride(0);
  p.a_stride_t = a.stride(1);
  p.a_stride_d = a.stride(2);
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.reverse = reverse;
  p.backward = backward;

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t bytes = static_cast<int64_t>(linrec::diagonal_scan_workspace_bytes(p));
  at::Tensor workspace = at::empty({bytes}, x.options().dtype(at::kByte));
  const cudaError_t err = linrec::diagonal_scan_launch(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "linrec CUDA diagonal scan launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "linrec CUDA kernels";
  m.def("diagonal_scan", &diagonal_scan, "Diagonal scan forward / backward (see linrec/_cuda.py)",
        py::arg("a"), py::arg("x"), py::arg("h0"), py::arg("cu_seqlens"), py::arg("out"), py::arg("h"),
        py::arg("grad_a"), py::arg("grad_h0"), py::arg("reverse"), py::arg("backward"));
}
