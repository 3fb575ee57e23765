// CUDA kernels of batch compaction, behind plain launchers that take raw pointers and a stream.
//
// This header and compaction_kernels.cu include no torch header on purpose: they compile with a
// bare CUDA toolkit, so CI builds the device code for real GPU targets with the machine's nvcc even
// though the installed torch is a CPU wheel (whose c10/cuda headers are incomplete). The ATen glue
// that checks arguments, allocates and picks the stream is compaction_cuda.cu.
//
// Memory traffic: compaction is a pure gather. For a bundle of tensors with kept rows A' it reads
// and writes A' * row_bytes per tensor once, with 16-byte vector accesses when the pointers, the
// row size and the dim-0 strides allow; that is the bandwidth floor. The index is computed once
// (one single-block scan over A flags) and shared by every tensor of the bundle, and all tensors
// are copied by one launch, so an event costs two launches and one host sync (the kept count,
// needed to size the outputs).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace adainfer {
namespace cuda {

// One row-copy job: dst[dst_index[i]] = src[src_index[i]] for i in [0, rows), a null index meaning
// the identity. Rows are row_bytes contiguous bytes; *_stride_bytes are the dim-0 strides. Indices
// outside [0, src_rows) / [0, dst_rows) are skipped (the glue validates them before launching; this
// is a second line of defence so that a bad index can never write out of bounds).
struct RowCopy {
  const void* src;
  void* dst;
  int64_t row_bytes;
  int64_t src_stride_bytes;
  int64_t dst_stride_bytes;
  const int64_t* src_index;
  const int64_t* dst_index;
  int64_t rows;
  int64_t src_rows;
  int64_t dst_rows;
};

// Jobs per launch: they travel by value in the kernel parameters (well under the 4 KiB limit).
constexpr int kMaxRowCopiesPerLaunch = 8;

// From keep[0..active) (bool) and row_map[0..active): kept positions (ascending) and their original
// rows, finished positions and their original rows, and *n_kept. The kept_* and finished_* buffers
// must hold `active` entries each (only the first n_kept / active - n_kept are written). One block.
cudaError_t launch_keep_index(const bool* keep, const int64_t* row_map, int64_t active,
                              int64_t* kept, int64_t* kept_rows, int64_t* finished,
                              int64_t* finished_rows, int64_t* n_kept, cudaStream_t stream);

// Runs every job of `copies[0..n)` (any n >= 0), kMaxRowCopiesPerLaunch jobs per launch.
cudaError_t launch_copy_rows(const RowCopy* copies, int n, cudaStream_t stream);

// Validates row indices on the device: for every value v of rows_a[0..n_a) and rows_b[0..n_b),
// sets bit 0 of *error when v is outside [0, bound) and bit 1 when v was seen before. `seen` must
// hold `bound` zeroed int32 counters and *error must be zero on entry.
cudaError_t launch_check_distinct_rows(const int64_t* rows_a, int64_t n_a, const int64_t* rows_b,
                                       int64_t n_b, int64_t bound, int32_t* seen, int32_t* error,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace adainfer
