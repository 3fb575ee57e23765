// The adainfer operator library: every schema under torch.ops.adainfer.* is defined here, once.
// Other op files add theirs with TORCH_LIBRARY_FRAGMENT(adainfer, m) and their kernels with
// TORCH_LIBRARY_IMPL. Fake (meta) implementations are registered from Python, in the module named
// by set_python_module, so that the ops trace under torch.compile; torch imports that module by
// itself when it needs a fake implementation that has not been registered yet.
#include <torch/library.h>

#include "compaction.h"

TORCH_LIBRARY(adainfer, m) {
  m.set_python_module("adainfer_kernels.compaction");

  // Compacts the batch-leading tensors of a layer state to the rows where keep is true, with one
  // index computation and one gather per tensor. Every tensor must have dim 0 == keep.size(0);
  // broadcast tensors (dim 0 == 1) and None are handled by the Python wrapper, which passes them
  // around the op (returning them from the op would alias an input).
  m.def(
      "compact_rows(Tensor keep, Tensor row_map, Tensor[] tensors) -> "
      "(Tensor[] compacted, Tensor kept_rows, Tensor kept, Tensor finished, Tensor finished_rows)");

  // out[rows[i]] = values[i], in place. rows must be distinct and in [0, out.size(0)).
  m.def("scatter_rows(Tensor(a!) out, Tensor rows, Tensor values) -> ()");

  // A new [batch_size, ...] tensor with row active_rows[i] = active_values[i] and row fill_rows[j]
  // = fill_values[j]; active_rows and fill_rows together must be a permutation of
  // range(batch_size).
  m.def(
      "merge_rows(Tensor active_values, Tensor active_rows, Tensor fill_values, Tensor fill_rows, "
      "SymInt batch_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(adainfer, CPU, m) {
  m.impl("compact_rows", &adainfer::compact_rows_cpu);
  m.impl("scatter_rows", &adainfer::scatter_rows_cpu);
  m.impl("merge_rows", &adainfer::merge_rows_cpu);
}
