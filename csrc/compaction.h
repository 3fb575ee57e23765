// Batch compaction (docs/architecture.md, "Compaction"): finished rows leave the batch so that the remaining decoder
// layers run on fewer rows, and their results go back to the original batch order at the end.
//
// Vocabulary:
//   A           rows currently active; every batch-leading tensor of the layer state has dim 0 == A
//   keep [A]    bool, true for the rows that stay
//   row_map [A] int64, original batch row of each active row
//
// All routines copy whole rows. A row of a tensor is the slice t[i]; when its trailing dimensions
// are laid out contiguously ("row-contiguous", whatever the dim-0 stride) a row is one memcpy of
// numel/rows * itemsize bytes, which is dtype-agnostic (bool, int64, fp16, bf16, fp32 ...). Other
// layouts (transposed K/V views, expanded masks) go through ATen's strided index_select /
// index_copy_ instead of being made contiguous first, which would copy every row, kept or not.
// So do new outputs of 32 MiB or more, whose copies are bound by first-touch page faults (see
// kFreshOutputBytes in compaction.cpp).
//
// The argument checks are shared by the CPU and CUDA kernels and use metadata only (no device
// sync). They raise c10 errors that Python sees as TypeError (dtype), ValueError (shape, device),
// IndexError (index values) or RuntimeError (overlap), the same types the Python fallback raises.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace adainfer {

// (tensors [A', ...], row_map [A'], kept [A'], finished [A - A'], finished_rows [A - A'])
using CompactResult =
    std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- argument checks (metadata only; shared by the CPU and CUDA kernels) ----

// keep: 1-D bool; row_map: int64 with keep's shape; every tensor: dim >= 1 and dim 0 == A; all on
// keep's device.
void check_compact_args(const at::Tensor& keep, const at::Tensor& row_map, at::TensorList tensors);

// out: [B, ...] without internal overlap; rows: 1-D int64; values: [n, ...] with out's trailing
// shape and dtype, not overlapping out; all on out's device. Index values are checked by the
// kernels.
void check_scatter_args(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& values);

// active_values [A, ...] and fill_values [F, ...] with the same trailing shape and dtype,
// active_rows [A] and fill_rows [F] int64, A + F == batch_size, all on one device. That the rows
// form a permutation of range(batch_size) is checked by the kernels (it needs the index values).
void check_merge_args(const at::Tensor& active_values, const at::Tensor& active_rows,
                      const at::Tensor& fill_values, const at::Tensor& fill_rows,
                      int64_t batch_size);

// ---- layout helpers ----

// True when t[i] is contiguous for every i (trailing dims row-major), whatever t.stride(0) is.
// Size-1 dims are ignored, as in at::Tensor::is_contiguous.
bool rows_are_contiguous(const at::Tensor& t);

// A new contiguous tensor of shape [rows, t.sizes()[1:]] with t's dtype and device.
at::Tensor empty_rows_like(const at::Tensor& t, int64_t rows);

// ---- CPU kernels ----

// Copies smaller than this run on the calling thread: a fork-join costs microseconds on an idle
// machine and a scheduler time slice on a busy one, more than copying this much.
constexpr int64_t kCopyGrainBytes = 256 * 1024;

// One row-copy job: dst[dst_index[i]] = src[src_index[i]] for i in [0, rows), a null index meaning
// the identity. A row is row_bytes contiguous bytes; *_stride are dim-0 strides in bytes (any
// value, 0 for an expanded source). Indices must be in range (the callers check).
struct RowCopyJob {
  const char* src;
  char* dst;
  int64_t row_bytes;
  int64_t src_stride;
  int64_t dst_stride;
  const int64_t* src_index;
  const int64_t* dst_index;
  int64_t rows;
};

// The job copying n rows of row-contiguous src into row-contiguous dst (equal trailing shapes and
// dtypes) through the given indices.
RowCopyJob row_copy_job(const at::Tensor& src, const int64_t* src_index, const at::Tensor& dst,
                        const int64_t* dst_index, int64_t n);

// The core routine: runs every job in ONE at::parallel_for over the total bytes, so a compaction
// event forks threads once whatever the number of tensors, and the split is balanced in bytes
// (a thread's range may start and end inside a row). Work under grain_bytes stays on the caller's
// thread. Jobs write disjoint rows, so the ranges never race.
void run_row_copies_cpu(const std::vector<RowCopyJob>& jobs, int64_t grain_bytes = kCopyGrainBytes);

// One job: dst[dst_index[i]] = src[src_index[i]] for i in [0, n) (see row_copy_job).
void copy_rows_cpu(const at::Tensor& src, const int64_t* src_index, const at::Tensor& dst,
                   const int64_t* dst_index, int64_t n);

// Checks that every value of rows_a and rows_b (1-D int64 CPU; rows_b may be undefined) lies in
// [0, bound) and that no value repeats across both (IndexError naming the tensor otherwise). With
// rows_a.numel() + rows_b.numel() == bound this means the two form a permutation of range(bound).
void check_distinct_rows_cpu(const at::Tensor& rows_a, const char* name_a, const at::Tensor& rows_b,
                             const char* name_b, int64_t bound);

CompactResult compact_rows_cpu(const at::Tensor& keep, const at::Tensor& row_map,
                               at::TensorList tensors);

void scatter_rows_cpu(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& values);

at::Tensor merge_rows_cpu(const at::Tensor& active_values, const at::Tensor& active_rows,
                          const at::Tensor& fill_values, const at::Tensor& fill_rows,
                          int64_t batch_size);

}  // namespace adainfer
