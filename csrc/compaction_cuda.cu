// CUDA kernels of the adainfer compaction ops: thin ATen glue around compaction_kernels.cu.
// Argument checks are the ones the CPU kernels use (compaction.cpp, metadata only); this file
// allocates, picks the device and stream, and launches. Compiled only when torch is a CUDA build.
//
// Host syncs: compact_rows syncs once per event (the kept count sizes the outputs; nonzero-style
// ops cannot avoid it) and not at all when there are no active rows. scatter_rows and merge_rows
// sync once per call to read the validation flag of their row indices, before writing anything.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "compaction.h"
#include "compaction_kernels.cuh"

namespace adainfer {
namespace {

int64_t row_bytes_of(const at::Tensor& t) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// A copy job for row-contiguous src and dst (see compaction.h); the index pointers are device
// pointers or null for the identity.
cuda::RowCopy row_copy(const at::Tensor& src, const int64_t* src_index, const at::Tensor& dst,
                       const int64_t* dst_index, int64_t rows) {
  cuda::RowCopy job{};
  job.src = src.const_data_ptr();
  job.dst = dst.mutable_data_ptr();
  job.row_bytes = row_bytes_of(src);
  job.src_stride_bytes = src.stride(0) * static_cast<int64_t>(src.element_size());
  job.dst_stride_bytes = dst.stride(0) * static_cast<int64_t>(dst.element_size());
  job.src_index = src_index;
  job.dst_index = dst_index;
  job.rows = rows;
  job.src_rows = src.size(0);
  job.dst_rows = dst.size(0);
  return job;
}

void run_copies(const std::vector<cuda::RowCopy>& jobs, cudaStream_t stream) {
  if (jobs.empty()) return;
  C10_CUDA_CHECK(cuda::launch_copy_rows(jobs.data(), static_cast<int>(jobs.size()), stream));
}

// One sync: the rows are validated on the device and only the error bits come back to the host.
void check_distinct_rows_cuda(const at::Tensor& rows_a, const char* name_a,
                              const at::Tensor& rows_b, const char* name_b, int64_t bound,
                              cudaStream_t stream) {
  const int64_t n_b = rows_b.defined() ? rows_b.numel() : 0;
  if (rows_a.numel() + n_b == 0) return;
  // bound counters followed by the error word, zeroed by one memset.
  at::Tensor seen = at::zeros({bound + 1}, rows_a.options().dtype(at::kInt));
  int32_t* counters = seen.mutable_data_ptr<int32_t>();
  C10_CUDA_CHECK(cuda::launch_check_distinct_rows(rows_a.const_data_ptr<int64_t>(), rows_a.numel(),
                                                  n_b ? rows_b.const_data_ptr<int64_t>() : nullptr,
                                                  n_b, bound, counters, counters + bound, stream));
  const int error = seen[bound].item<int>();
  const char* names_b = n_b ? " or " : "";
  TORCH_CHECK_INDEX((error & 1) == 0, "a value of ", name_a, names_b, n_b ? name_b : "",
                    " is out of range [0, ", bound, ")");
  TORCH_CHECK_INDEX((error & 2) == 0, "a row of ", name_a, names_b, n_b ? name_b : "",
                    " repeats: every row must be written exactly once");
}

// values[i] -> out[rows[i]] for rows already validated: the copy kernel for row-contiguous tensors,
// ATen's strided index_copy_ otherwise. Jobs are collected so that one launch does all of them.
void add_scatter(std::vector<cuda::RowCopy>& jobs, const at::Tensor& out, const at::Tensor& rows,
                 const at::Tensor& values) {
  if (rows.numel() == 0) return;
  if (rows_are_contiguous(out) && rows_are_contiguous(values)) {
    jobs.push_back(row_copy(values, nullptr, out, rows.const_data_ptr<int64_t>(), rows.numel()));
  } else {
    out.index_copy_(0, rows, values);
  }
}

CompactResult compact_rows_cuda(const at::Tensor& keep, const at::Tensor& row_map,
                                at::TensorList tensors) {
  check_compact_args(keep, row_map, tensors);
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t active = keep.size(0);
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor map_c = row_map.contiguous();
  const auto index_opts = row_map.options();
  at::Tensor kept = at::empty({active}, index_opts);
  at::Tensor kept_rows = at::empty({active}, index_opts);
  at::Tensor finished = at::empty({active}, index_opts);
  at::Tensor finished_rows = at::empty({active}, index_opts);
  int64_t n_kept = 0;
  if (active > 0) {
    at::Tensor count = at::empty({1}, index_opts);
    C10_CUDA_CHECK(cuda::launch_keep_index(
        keep_c.const_data_ptr<bool>(), map_c.const_data_ptr<int64_t>(), active,
        kept.mutable_data_ptr<int64_t>(), kept_rows.mutable_data_ptr<int64_t>(),
        finished.mutable_data_ptr<int64_t>(), finished_rows.mutable_data_ptr<int64_t>(),
        count.mutable_data_ptr<int64_t>(), stream));
    n_kept = count.item<int64_t>();  // the event's one host sync
  }
  // Shrink in place rather than narrow: the outputs must be tensors of their own, not views of a
  // temporary (the buffers were sized for the worst case, every row kept or every row finished).
  kept.resize_({n_kept});
  kept_rows.resize_({n_kept});
  finished.resize_({active - n_kept});
  finished_rows.resize_({active - n_kept});

  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  std::vector<cuda::RowCopy> jobs;
  const int64_t* kept_index = kept.const_data_ptr<int64_t>();
  for (const at::Tensor& t : tensors) {
    if (rows_are_contiguous(t)) {
      at::Tensor o = empty_rows_like(t, n_kept);
      jobs.push_back(row_copy(t, kept_index, o, nullptr, n_kept));
      out.push_back(std::move(o));
    } else {
      out.push_back(at::index_select(t, 0, kept));  // strided rows: ATen's gather, no sync
    }
  }
  run_copies(jobs, stream);  // one launch for up to kMaxRowCopiesPerLaunch tensors
  return {std::move(out), std::move(kept_rows), std::move(kept), std::move(finished),
          std::move(finished_rows)};
}

void scatter_rows_cuda(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& values) {
  check_scatter_args(out, rows, values);
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor rows_c = rows.contiguous();
  check_distinct_rows_cuda(rows_c, "rows", at::Tensor(), "", out.size(0), stream);
  std::vector<cuda::RowCopy> jobs;
  add_scatter(jobs, out, rows_c, values);
  run_copies(jobs, stream);
}

at::Tensor merge_rows_cuda(const at::Tensor& active_values, const at::Tensor& active_rows,
                           const at::Tensor& fill_values, const at::Tensor& fill_rows,
                           int64_t batch_size) {
  check_merge_args(active_values, active_rows, fill_values, fill_rows, batch_size);
  const c10::cuda::CUDAGuard guard(active_values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor active_c = active_rows.contiguous();
  const at::Tensor fill_c = fill_rows.contiguous();
  // A + F == batch_size is checked above, so distinct in-range rows are a permutation and every
  // output row is written exactly once.
  check_distinct_rows_cuda(active_c, "active_rows", fill_c, "fill_rows", batch_size, stream);
  at::Tensor out = empty_rows_like(active_values, batch_size);
  std::vector<cuda::RowCopy> jobs;
  add_scatter(jobs, out, active_c, active_values);
  add_scatter(jobs, out, fill_c, fill_values);
  run_copies(jobs, stream);
  return out;
}

}  // namespace
}  // namespace adainfer

TORCH_LIBRARY_IMPL(adainfer, CUDA, m) {
  m.impl("compact_rows", &adainfer::compact_rows_cuda);
  m.impl("scatter_rows", &adainfer::scatter_rows_cuda);
  m.impl("merge_rows", &adainfer::merge_rows_cuda);
}
