#include "build_info.h"

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#define ADAINFER_STR2(x) #x
#define ADAINFER_STR(x) ADAINFER_STR2(x)

namespace adainfer {

BuildInfo build_info() {
  BuildInfo info;
#if defined(TORCH_VERSION_MAJOR)
  info.torch_version = ADAINFER_STR(TORCH_VERSION_MAJOR) "." ADAINFER_STR(
      TORCH_VERSION_MINOR) "." ADAINFER_STR(TORCH_VERSION_PATCH);
#else
  info.torch_version = "unknown";
#endif
#if defined(ADAINFER_WITH_CUDA)
  info.with_cuda = true;
#else
  info.with_cuda = false;
#endif
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " ADAINFER_STR(__GNUC__) "." ADAINFER_STR(__GNUC_MINOR__) "." ADAINFER_STR(
      __GNUC_PATCHLEVEL__);
#else
  info.compiler = "unknown";
#endif
  info.cxx_standard = ADAINFER_STR(__cplusplus);
  return info;
}

}  // namespace adainfer
