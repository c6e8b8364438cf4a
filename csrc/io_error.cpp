// Message formatting for the engine's exceptions (see io_error.hpp).
#include "io_error.hpp"

#include <cstring>
#include <utility>

namespace dcp_native {

namespace {

// strerror_r is the XSI variant (returns int) or the GNU one (returns the
// message, possibly not in buf) depending on feature macros; overloads accept
// either without #ifdefs.
[[maybe_unused]] const char* strerror_result(int result, const char* buffer) {
  return result == 0 ? buffer : nullptr;
}
[[maybe_unused]] const char* strerror_result(const char* result, const char*) { return result; }

std::string describe(int error_number, const std::string& operation, int64_t offset) {
  std::string text = errno_message(error_number) + " (" + operation;
  if (offset >= 0) {
    text += " at offset " + std::to_string(offset);
  }
  return text + ")";
}

}  // namespace

std::string errno_message(int error_number) {
  char buffer[256];
  buffer[0] = '\0';
  const char* message =
      strerror_result(strerror_r(error_number, buffer, sizeof(buffer)), buffer);
  if (message == nullptr || message[0] == '\0') {
    return "Unknown error " + std::to_string(error_number);
  }
  return message;
}

IoError::IoError(int error_number, std::string operation, std::string path, int64_t offset)
    : std::runtime_error(describe(error_number, operation, offset) + ": " + path),
      error_number_(error_number),
      operation_(std::move(operation)),
      path_(std::move(path)),
      offset_(offset),
      detail_(describe(error_number_, operation_, offset_)) {}

TruncatedError::TruncatedError(std::string path, int64_t expected, int64_t actual)
    : std::runtime_error(path + " is truncated: the checkpoint needs at least " +
                         std::to_string(expected) + " bytes, the file has " +
                         std::to_string(actual)),
      path_(std::move(path)),
      expected_(expected),
      actual_(actual) {}

}  // namespace dcp_native
