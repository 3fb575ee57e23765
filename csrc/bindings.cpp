// Python module `adainfer_kernels._C`. Importing it also runs the TORCH_LIBRARY registrations of
// the op files linked into it, so the ops appear under torch.ops.adainfer.*.
#include <torch/extension.h>

#include "build_info.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adainfer-kernels native ops (registered under torch.ops.adainfer)";
  m.def(
      "build_info",
      []() {
        const adainfer::BuildInfo info = adainfer::build_info();
        pybind11::dict d;
        d["torch_version"] = info.torch_version;
        d["with_cuda"] = info.with_cuda;
        d["compiler"] = info.compiler;
        d["cxx_standard"] = info.cxx_standard;
        return d;
      },
      "What this extension was compiled with (torch headers version, CUDA, compiler).");
}
