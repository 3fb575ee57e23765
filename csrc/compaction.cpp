// Batch compaction: argument checks (shared with the CUDA kernels) and the CPU kernels.
// See compaction.h for the vocabulary and the layout policy.
#include "compaction.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace adainfer {
namespace {

// New CPU outputs at least this large are written by ATen's own gather/scatter instead of memcpy.
// glibc serves allocations above its 32 MiB maximum mmap threshold with fresh pages on every call,
// so such copies are bound by first-touch page faults, and there ATen's vectorised copy kernel
// beats glibc's memcpy (measured on this machine: 47 vs 58 ms for 64 MiB; on warm pages memcpy
// wins, 12.5 vs 13.8 ms, which is why smaller outputs keep the memcpy path).
constexpr int64_t kFreshOutputBytes = int64_t{32} << 20;

// Elements of one row: the product of the trailing sizes (1 for a 1-D tensor).
int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

void check_plain_tensor(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", what, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", what,
                    " must be a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK_TYPE(!t.is_quantized(), op, ": ", what, " must not be quantized");
}

void check_index_tensor(const at::Tensor& rows, const char* op, const char* what) {
  check_plain_tensor(rows, op, what);
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, op, ": ", what, " must be int64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1, op, ": ", what, " must be 1-D, got shape ", rows.sizes());
}

// Adds the job for values[i] -> out[rows[i]] (rows already validated, out freshly allocated or
// checked for overlap) where both sides are row-contiguous and out is not a large fresh
// allocation; otherwise copies right away with ATen's index_copy_. `rows` must stay alive until
// the jobs have run.
void add_scatter(std::vector<RowCopyJob>& jobs, const at::Tensor& out, const at::Tensor& rows,
                 const at::Tensor& values, bool out_is_fresh) {
  if (rows.numel() == 0) return;
  const bool large_fresh = out_is_fresh && static_cast<int64_t>(out.nbytes()) >= kFreshOutputBytes;
  if (!large_fresh && rows_are_contiguous(out) && rows_are_contiguous(values)) {
    jobs.push_back(
        row_copy_job(values, nullptr, out, rows.const_data_ptr<int64_t>(), rows.numel()));
  } else {
    out.index_copy_(0, rows, values);
  }
}

}  // namespace

// ---- argument checks ----

void check_compact_args(const at::Tensor& keep, const at::Tensor& row_map, at::TensorList tensors) {
  constexpr const char* op = "compact_rows";
  check_plain_tensor(keep, op, "keep");
  check_plain_tensor(row_map, op, "row_map");
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, op, ": keep must be a bool tensor, got ",
                   keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 1, op, ": keep must be 1-D (one flag per active row), got shape ",
                    keep.sizes());
  TORCH_CHECK_TYPE(row_map.scalar_type() == at::kLong, op, ": row_map must be int64, got ",
                   row_map.scalar_type());
  TORCH_CHECK_VALUE(row_map.sizes() == keep.sizes(), op, ": row_map must have keep's shape ",
                    keep.sizes(), " (one original row per active row), got ", row_map.sizes());
  TORCH_CHECK_VALUE(row_map.device() == keep.device(), op, ": keep is on ", keep.device(),
                    " but row_map is on ", row_map.device());
  const int64_t active = keep.size(0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_plain_tensor(t, op, "every tensor");
    TORCH_CHECK_VALUE(t.device() == keep.device(), op, ": tensors[", i, "] is on ", t.device(),
                      " but keep is on ", keep.device());
    TORCH_CHECK_VALUE(t.dim() >= 1, op, ": tensors[", i,
                      "] is 0-d; batch-leading tensors need a row dimension");
    TORCH_CHECK_VALUE(
        t.size(0) == active, op, ": tensors[", i, "] has shape ", t.sizes(), " but there are ",
        active,
        " active rows (dim 0 must equal keep's length; pass broadcast tensors around this op)");
  }
}

void check_scatter_args(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& values) {
  constexpr const char* op = "scatter_rows";
  check_plain_tensor(out, op, "out");
  check_plain_tensor(values, op, "values");
  check_index_tensor(rows, op, "rows");
  TORCH_CHECK_VALUE(out.dim() >= 1, op, ": out is 0-d; it needs a batch dimension");
  TORCH_CHECK_VALUE(rows.device() == out.device() && values.device() == out.device(), op,
                    ": out is on ", out.device(), ", rows on ", rows.device(), ", values on ",
                    values.device(), "; all must be on one device");
  TORCH_CHECK_VALUE(values.dim() == out.dim() && values.size(0) == rows.size(0) &&
                        values.sizes().slice(1) == out.sizes().slice(1),
                    op, ": values of shape ", values.sizes(), " do not fit rows of shape ",
                    rows.sizes(), " and out of shape ", out.sizes(),
                    " (expected [rows, *out.shape[1:]])");
  TORCH_CHECK_TYPE(values.scalar_type() == out.scalar_type(), op, ": values are ",
                   values.scalar_type(), " but out is ", out.scalar_type());
  // Writing through an expanded `out`, or from values that alias it, would race and give
  // order-dependent results: refuse both (RuntimeError, as ATen's own in-place ops do).
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, values);
}

void check_merge_args(const at::Tensor& active_values, const at::Tensor& active_rows,
                      const at::Tensor& fill_values, const at::Tensor& fill_rows,
                      int64_t batch_size) {
  constexpr const char* op = "merge_rows";
  check_plain_tensor(active_values, op, "active_values");
  check_plain_tensor(fill_values, op, "fill_values");
  check_index_tensor(active_rows, op, "active_rows");
  check_index_tensor(fill_rows, op, "fill_rows");
  const at::Device device = active_values.device();
  TORCH_CHECK_VALUE(active_rows.device() == device && fill_values.device() == device &&
                        fill_rows.device() == device,
                    op, ": all tensors must be on one device; got active_values on ", device,
                    ", active_rows on ", active_rows.device(), ", fill_values on ",
                    fill_values.device(), ", fill_rows on ", fill_rows.device());
  TORCH_CHECK_VALUE(active_values.dim() >= 1, op,
                    ": active_values is 0-d; it needs a row dimension");
  TORCH_CHECK_VALUE(active_values.size(0) == active_rows.size(0), op, ": active_values has ",
                    active_values.size(0), " rows but active_rows has ", active_rows.size(0),
                    " entries");
  TORCH_CHECK_VALUE(fill_values.dim() == active_values.dim() &&
                        fill_values.sizes().slice(1) == active_values.sizes().slice(1),
                    op, ": fill_values of shape ", fill_values.sizes(),
                    " must have the trailing shape of active_values ", active_values.sizes());
  TORCH_CHECK_VALUE(fill_values.size(0) == fill_rows.size(0), op, ": fill_values has ",
                    fill_values.size(0), " rows but fill_rows has ", fill_rows.size(0), " entries");
  TORCH_CHECK_TYPE(fill_values.scalar_type() == active_values.scalar_type(), op,
                   ": fill_values are ", fill_values.scalar_type(), " but active_values are ",
                   active_values.scalar_type());
  TORCH_CHECK_VALUE(batch_size >= 0, op, ": batch_size must be >= 0, got ", batch_size);
  TORCH_CHECK_VALUE(active_rows.size(0) + fill_rows.size(0) == batch_size, op, ": ",
                    active_rows.size(0), " active rows + ", fill_rows.size(0),
                    " fill rows != batch_size ", batch_size,
                    " (together they must be a permutation of range(batch_size))");
}

// ---- layout helpers ----

bool rows_are_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    const int64_t size = t.size(d);
    if (size == 0) return true;  // empty rows: nothing is ever copied
    if (size == 1) continue;     // the stride of a size-1 dim is never used
    if (t.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

at::Tensor empty_rows_like(const at::Tensor& t, int64_t rows) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] = rows;
  return at::empty(sizes, t.options().memory_format(at::MemoryFormat::Contiguous));
}

// ---- CPU kernels ----

RowCopyJob row_copy_job(const at::Tensor& src, const int64_t* src_index, const at::Tensor& dst,
                        const int64_t* dst_index, int64_t n) {
  const auto itemsize = static_cast<int64_t>(src.element_size());
  RowCopyJob job{};
  job.row_bytes = row_numel(src) * itemsize;
  job.rows = (n > 0 && job.row_bytes > 0) ? n : 0;
  if (job.rows == 0) return job;  // nothing to copy; empty tensors may have no data pointer
  job.src = static_cast<const char*>(src.const_data_ptr());
  job.dst = static_cast<char*>(dst.mutable_data_ptr());
  job.src_stride = src.stride(0) * itemsize;
  job.dst_stride = dst.stride(0) * itemsize;
  job.src_index = src_index;
  job.dst_index = dst_index;
  return job;
}

void run_row_copies_cpu(const std::vector<RowCopyJob>& jobs, int64_t grain_bytes) {
  // The jobs' bytes laid end to end: job j owns [start[j], start[j + 1]).
  std::vector<int64_t> start(jobs.size() + 1, 0);
  for (size_t j = 0; j < jobs.size(); ++j)
    start[j + 1] = start[j] + jobs[j].rows * jobs[j].row_bytes;
  const int64_t total = start.back();
  if (total == 0) return;
  at::parallel_for(0, total, std::max<int64_t>(grain_bytes, 1), [&](int64_t begin, int64_t end) {
    // The last job starting at or before `begin` (skips empty jobs that share its start).
    size_t j =
        static_cast<size_t>(std::upper_bound(start.begin(), start.end(), begin) - start.begin()) -
        1;
    for (int64_t pos = begin; pos < end; ++j) {
      const RowCopyJob& job = jobs[j];
      const int64_t job_end = std::min(end, start[j + 1]);
      while (pos < job_end) {
        const int64_t local = pos - start[j];
        const int64_t i = local / job.row_bytes;
        const int64_t offset = local % job.row_bytes;
        const int64_t bytes = std::min(job.row_bytes - offset, job_end - pos);
        const int64_t s = job.src_index != nullptr ? job.src_index[i] : i;
        const int64_t d = job.dst_index != nullptr ? job.dst_index[i] : i;
        std::memcpy(job.dst + d * job.dst_stride + offset, job.src + s * job.src_stride + offset,
                    static_cast<size_t>(bytes));
        pos += bytes;
      }
    }
  });
}

void copy_rows_cpu(const at::Tensor& src, const int64_t* src_index, const at::Tensor& dst,
                   const int64_t* dst_index, int64_t n) {
  run_row_copies_cpu({row_copy_job(src, src_index, dst, dst_index, n)});
}

void check_distinct_rows_cpu(const at::Tensor& rows_a, const char* name_a, const at::Tensor& rows_b,
                             const char* name_b, int64_t bound) {
  std::vector<uint8_t> seen(static_cast<size_t>(std::max<int64_t>(bound, 0)), 0);
  auto visit = [&](const at::Tensor& rows, const char* name) {
    if (!rows.defined()) return;
    const at::Tensor r = rows.contiguous();
    const int64_t* p = r.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < r.numel(); ++i) {
      const int64_t v = p[i];
      TORCH_CHECK_INDEX(v >= 0 && v < bound, name, "[", i, "] = ", v, " is out of range [0, ",
                        bound, ")");
      TORCH_CHECK_INDEX(seen[v] == 0, name, "[", i, "] = ", v,
                        " repeats a row given before: every row must be written exactly once");
      seen[v] = 1;
    }
  };
  visit(rows_a, name_a);
  visit(rows_b, name_b);
}

CompactResult compact_rows_cpu(const at::Tensor& keep, const at::Tensor& row_map,
                               at::TensorList tensors) {
  check_compact_args(keep, row_map, tensors);
  const int64_t active = keep.size(0);
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor map_c = row_map.contiguous();
  const bool* flags = keep_c.const_data_ptr<bool>();
  const int64_t* map = map_c.const_data_ptr<int64_t>();

  // The one index computation: kept and finished positions, and their original rows, in order.
  int64_t n_kept = 0;
  for (int64_t i = 0; i < active; ++i) n_kept += flags[i] ? 1 : 0;
  const auto index_opts = row_map.options();
  at::Tensor kept = at::empty({n_kept}, index_opts);
  at::Tensor finished = at::empty({active - n_kept}, index_opts);
  at::Tensor kept_rows = at::empty({n_kept}, index_opts);
  at::Tensor finished_rows = at::empty({active - n_kept}, index_opts);
  int64_t* k = kept.mutable_data_ptr<int64_t>();
  int64_t* f = finished.mutable_data_ptr<int64_t>();
  int64_t* kr = kept_rows.mutable_data_ptr<int64_t>();
  int64_t* fr = finished_rows.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < active; ++i) {
    if (flags[i]) {
      *k++ = i;
      *kr++ = map[i];
    } else {
      *f++ = i;
      *fr++ = map[i];
    }
  }

  // One gather per tensor with that index, all in one parallel region.
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  std::vector<RowCopyJob> jobs;
  const int64_t* kept_index = kept.const_data_ptr<int64_t>();
  for (const at::Tensor& t : tensors) {
    const int64_t out_bytes = n_kept * row_numel(t) * static_cast<int64_t>(t.element_size());
    if (rows_are_contiguous(t) && out_bytes < kFreshOutputBytes) {
      at::Tensor o = empty_rows_like(t, n_kept);
      jobs.push_back(row_copy_job(t, kept_index, o, nullptr, n_kept));
      out.push_back(std::move(o));
    } else {
      // Strided rows (e.g. an expanded 4-D mask) or a large output: ATen gathers only the kept
      // rows, contiguously.
      out.push_back(at::index_select(t, 0, kept));
    }
  }
  run_row_copies_cpu(jobs);
  return {std::move(out), std::move(kept_rows), std::move(kept), std::move(finished),
          std::move(finished_rows)};
}

void scatter_rows_cpu(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& values) {
  check_scatter_args(out, rows, values);
  check_distinct_rows_cpu(rows, "rows", at::Tensor(), "", out.size(0));
  const at::Tensor rows_c = rows.contiguous();
  std::vector<RowCopyJob> jobs;
  add_scatter(jobs, out, rows_c, values, /*out_is_fresh=*/false);
  run_row_copies_cpu(jobs);
}

at::Tensor merge_rows_cpu(const at::Tensor& active_values, const at::Tensor& active_rows,
                          const at::Tensor& fill_values, const at::Tensor& fill_rows,
                          int64_t batch_size) {
  check_merge_args(active_values, active_rows, fill_values, fill_rows, batch_size);
  // With A + F == batch_size (checked above), distinct in-range rows are a permutation, so every
  // output row is written exactly once and the uninitialised output never leaks.
  check_distinct_rows_cpu(active_rows, "active_rows", fill_rows, "fill_rows", batch_size);
  at::Tensor out = empty_rows_like(active_values, batch_size);
  const at::Tensor active_c = active_rows.contiguous();
  const at::Tensor fill_c = fill_rows.contiguous();
  std::vector<RowCopyJob> jobs;
  add_scatter(jobs, out, active_c, active_values, /*out_is_fresh=*/true);
  add_scatter(jobs, out, fill_c, fill_values, /*out_is_fresh=*/true);
  run_row_copies_cpu(jobs);
  return out;
}

}  // namespace adainfer
