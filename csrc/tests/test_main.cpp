// C++ unit tests of csrc/, built by CMake and run by ctest (no Python involved).
// A minimal self-contained runner: each test is a function that throws on failure.
#include <cstdlib>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "test_registry.h"

namespace adainfer_test {

std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

Registrar::Registrar(const char* name, std::function<void()> fn) {
  registry().emplace_back(name, std::move(fn));
}

}  // namespace adainfer_test

ADAINFER_TEST(build_info_reports_the_compile) {
  const adainfer::BuildInfo info = adainfer::build_info();
  ADAINFER_EXPECT(!info.torch_version.empty() && info.torch_version != "unknown");
  ADAINFER_EXPECT(info.torch_version.find('.') != std::string::npos);
  ADAINFER_EXPECT(!info.compiler.empty());
#if defined(ADAINFER_WITH_CUDA)
  ADAINFER_EXPECT(info.with_cuda);
#else
  ADAINFER_EXPECT(!info.with_cuda);
#endif
}

int main() {
  int failed = 0;
  for (auto& [name, fn] : adainfer_test::registry()) {
    try {
      fn();
      std::cout << "[ OK   ] " << name << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "[ FAIL ] " << name << ": " << e.what() << "\n";
    }
  }
  std::cout << adainfer_test::registry().size() << " tests, " << failed << " failed\n";
  return failed == 0 && !adainfer_test::registry().empty() ? EXIT_SUCCESS : EXIT_FAILURE;
}
