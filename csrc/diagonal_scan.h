// Host interface of the CUDA diagonal scan (no torch headers: the binding adapts tensors to this).
//
// The kernel computes, per channel and along time,
//
//     forward  (backward == false):  h_t = a_t * h_{t-1} + x_t          (reverse: h_{t+1})
//     backward (backward == true):   g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}   (mirrored for reverse)
//                                    dL/da_t = g_t * conj(h_{t-1}),  dL/dh0 = conj(a_first) g_first
//
// with fp32 (complex64) accumulation whatever the storage dtype.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace linrec {

// Storage dtype of a, x (or dL/dh), h and the main output. Accumulation, initial states,
// dL/da and dL/dh0 are float32 (complex64 for kComplex64).
enum class ScanDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kComplex64 = 3 };

struct DiagonalScanParams {
  ScanDtype dtype = ScanDtype::kFloat32;
  int64_t batch = 0;     // B (1 when cu_seqlens is given)
  int64_t seqlen = 0;    // T
  int64_t dim = 0;       // D
  int64_t num_seqs = 0;  // N: B, or the number of packed sequences

  // Coefficients, indexed a[b * a_stride_b + t * a_stride_t + d * a_stride_d] (strides in
  // elements; 0 for broadcast dimensions).
  const void* a = nullptr;
  int64_t a_stride_b = 0, a_stride_t = 0, a_stride_d = 0;

  const void* x = nullptr;           // forward: x; backward: dL/dh.   (B, T, D) contiguous
  const void* h0 = nullptr;          // (N, D) contiguous, accumulation dtype, or null for zeros
  const int64_t* cu_seqlens = nullptr;  // (N + 1,) packed-sequence offsets, or null
  void* out = nullptr;               // forward: h; backward: dL/dx.   (B, T, D) contiguous

  // Backward only.
  const void* h = nullptr;           // forward states (B, T, D) contiguous
  void* grad_a = nullptr;            // (B, T, D) contiguous, accumulation dtype
  void* grad_h0 = nullptr;           // (N, D) contiguous, accumulation dtype, zero-filled by the caller

  bool reverse = false;   // the forward recurrence runs from t = T down to 1
  bool backward = false;
};

// Bytes of device scratch memory diagonal_scan_launch needs (status flags and carries of the
// decoupled look-back between time chunks). Pass a buffer at least this large, 16-byte aligned.
size_t diagonal_scan_workspace_bytes(const DiagonalScanParams& params);

// Enqueues the scan on `stream` (clears the workspace's flags first). Returns the launch error.
cudaError_t diagonal_scan_launch(const DiagonalScanParams& params, void* workspace, cudaStream_t stream);

}  // namespace linrec
