// Tiny test registry for the ctest executable: ADAINFER_TEST(name) { ... ADAINFER_EXPECT(cond); }
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

namespace adainfer_test {

struct Registrar {
  Registrar(const char* name, std::function<void()> fn);
};

}  // namespace adainfer_test

#define ADAINFER_TEST(name)                                                  \
  static void name();                                                        \
  static ::adainfer_test::Registrar name##_registrar(#name, name);           \
  static void name()

#define ADAINFER_EXPECT(cond)                                                               \
  do {                                                                                      \
    if (!(cond))                                                                            \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) +    \
                               ": expected " #cond);                                       \
  } while (0)
