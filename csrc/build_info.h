// What adainfer_kernels._C was built with: reported by `adainfer info` and checked against the
// torch found at run time (an extension built against another torch must not be used silently).
#pragma once

#include <string>

namespace adainfer {

struct BuildInfo {
  std::string torch_version;  // "major.minor.patch" of the torch headers compiled against
  bool with_cuda;             // CUDA kernels compiled in (torch was a CUDA build)
  std::string compiler;       // e.g. "gcc 12.2.0"
  std::string cxx_standard;   // e.g. "201703"
};

BuildInfo build_info();

}  // namespace adainfer
