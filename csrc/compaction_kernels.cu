// CUDA kernels of batch compaction (see compaction_kernels.cuh for the contract and the traffic
// argument). No torch header here: this file builds with a bare CUDA toolkit.
#include <algorithm>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "compaction_kernels.cuh"

namespace adainfer {
namespace cuda {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kCopyThreads = 256;
// Blocks along one row: enough to keep every SM busy on a few huge rows (prefill hidden states),
// few enough that small rows (position ids) do not launch thousands of idle blocks.
constexpr int64_t kMaxBlocksPerRow = 64;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kCheckThreads = 256;
constexpr int64_t kMaxCheckBlocks = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Widest access (16, 8, 4, 2 or 1 bytes) that every address of the job is aligned to.
int vector_width(const RowCopy& job) {
  const uint64_t bits =
      reinterpret_cast<uintptr_t>(job.src) | reinterpret_cast<uintptr_t>(job.dst) |
      static_cast<uint64_t>(job.row_bytes) | static_cast<uint64_t>(job.src_stride_bytes) |
      static_cast<uint64_t>(job.dst_stride_bytes);
  for (int width = 16; width > 1; width /= 2) {
    if (bits % width == 0) return width;
  }
  return 1;
}

struct RowCopyBatch {
  RowCopy job[kMaxRowCopiesPerLaunch];
  int width[kMaxRowCopiesPerLaunch];
};

// One block scans the flags in chunks of kScanThreads, carrying the kept count across chunks, so
// kept and finished positions come out in ascending order with a single pass and a single launch.
// Batches are at most a few thousand rows, for which one block is both enough and cheapest.
__global__ void __launch_bounds__(kScanThreads)
    keep_index_kernel(const bool* __restrict__ keep, const int64_t* __restrict__ row_map,
                      int64_t active, int64_t* __restrict__ kept, int64_t* __restrict__ kept_rows,
                      int64_t* __restrict__ finished, int64_t* __restrict__ finished_rows,
                      int64_t* __restrict__ n_kept) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  int64_t kept_before = 0;  // kept rows in earlier chunks
  for (int64_t start = 0; start < active; start += kScanThreads) {
    const int64_t i = start + threadIdx.x;
    const int flag = (i < active && keep[i]) ? 1 : 0;
    int prefix = 0;
    int chunk_total = 0;
    Scan(temp).ExclusiveSum(flag, prefix, chunk_total);
    if (i < active) {
      const int64_t k = kept_before + prefix;  // kept rows before row i
      if (flag) {
        kept[k] = i;
        kept_rows[k] = row_map[i];
      } else {
        finished[i - k] = i;
        finished_rows[i - k] = row_map[i];
      }
    }
    kept_before += chunk_total;
    __syncthreads();  // the next chunk's scan reuses `temp`
  }
  if (threadIdx.x == 0) *n_kept = kept_before;
}

template <typename Unit>
__device__ __forceinline__ void copy_units(char* __restrict__ dst, const char* __restrict__ src,
                                           int64_t units, int64_t first, int64_t step) {
  const Unit* s = reinterpret_cast<const Unit*>(src);
  Unit* d = reinterpret_cast<Unit*>(dst);
  for (int64_t u = first; u < units; u += step) d[u] = s[u];
}

// grid.z: job; grid.y: rows (grid-stride); grid.x * blockDim.x: units of a row (grid-stride).
// __grid_constant__ lets threads index the job array in parameter space without a local copy.
__global__ void __launch_bounds__(kCopyThreads)
    copy_rows_kernel(const __grid_constant__ RowCopyBatch batch) {
  const RowCopy& job = batch.job[blockIdx.z];
  const int width = batch.width[blockIdx.z];
  const int64_t units = job.row_bytes / width;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (first >= units) return;
  for (int64_t r = blockIdx.y; r < job.rows; r += gridDim.y) {
    const int64_t s = job.src_index != nullptr ? job.src_index[r] : r;
    const int64_t d = job.dst_index != nullptr ? job.dst_index[r] : r;
    if (s < 0 || s >= job.src_rows || d < 0 || d >= job.dst_rows) continue;
    const char* src = static_cast<const char*>(job.src) + s * job.src_stride_bytes;
    char* dst = static_cast<char*>(job.dst) + d * job.dst_stride_bytes;
    switch (width) {
      case 16:
        copy_units<uint4>(dst, src, units, first, step);
        break;
      case 8:
        copy_units<uint2>(dst, src, units, first, step);
        break;
      case 4:
        copy_units<uint32_t>(dst, src, units, first, step);
        break;
      case 2:
        copy_units<uint16_t>(dst, src, units, first, step);
        break;
      default:
        copy_units<uint8_t>(dst, src, units, first, step);
        break;
    }
  }
}

__global__ void check_distinct_rows_kernel(const int64_t* __restrict__ rows_a, int64_t n_a,
                                           const int64_t* __restrict__ rows_b, int64_t n_b,
                                           int64_t bound, int32_t* __restrict__ seen,
                                           int32_t* __restrict__ error) {
  const int64_t n = n_a + n_b;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = i < n_a ? rows_a[i] : rows_b[i - n_a];
    if (v < 0 || v >= bound) {
      atomicOr(error, 1);
    } else if (atomicAdd(&seen[v], 1) != 0) {
      atomicOr(error, 2);
    }
  }
}

}  // namespace

cudaError_t launch_keep_index(const bool* keep, const int64_t* row_map, int64_t active,
                              int64_t* kept, int64_t* kept_rows, int64_t* finished,
                              int64_t* finished_rows, int64_t* n_kept, cudaStream_t stream) {
  keep_index_kernel<<<1, kScanThreads, 0, stream>>>(keep, row_map, active, kept, kept_rows,
                                                    finished, finished_rows, n_kept);
  return cudaGetLastError();
}

cudaError_t launch_copy_rows(const RowCopy* copies, int n, cudaStream_t stream) {
  int next = 0;
  while (next < n) {
    RowCopyBatch batch{};
    int count = 0;
    int64_t max_units = 0;
    int64_t max_rows = 0;
    for (; next < n && count < kMaxRowCopiesPerLaunch; ++next) {
      const RowCopy& job = copies[next];
      if (job.rows <= 0 || job.row_bytes <= 0) continue;  // nothing to copy: no grid slice for it
      const int width = vector_width(job);
      batch.job[count] = job;
      batch.width[count] = width;
      max_units = std::max(max_units, job.row_bytes / width);
      max_rows = std::max(max_rows, job.rows);
      ++count;
    }
    if (count == 0) continue;
    const dim3 grid(
        static_cast<unsigned>(std::min(ceil_div(max_units, kCopyThreads), kMaxBlocksPerRow)),
        static_cast<unsigned>(std::min(max_rows, kMaxGridY)), static_cast<unsigned>(count));
    copy_rows_kernel<<<grid, kCopyThreads, 0, stream>>>(batch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_check_distinct_rows(const int64_t* rows_a, int64_t n_a, const int64_t* rows_b,
                                       int64_t n_b, int64_t bound, int32_t* seen, int32_t* error,
                                       cudaStream_t stream) {
  const int64_t n = n_a + n_b;
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min(ceil_div(n, kCheckThreads), kMaxCheckBlocks));
  check_distinct_rows_kernel<<<blocks, kCheckThreads, 0, stream>>>(rows_a, n_a, rows_b, n_b, bound,
                                                                   seen, error);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace adainfer
