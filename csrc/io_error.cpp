// Message formatting for the engine's exceptions (see io_error.hpp).
#include "io_error.hpp"

#include <sys/stat.h>

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

// strerror() for any thread: strerror itself may share one static buffer.
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

std::string describe(int error_number, const std::string& operation, int64_t offset) {
  std::string text = errno_message(error_number) + " (" + operation;
  if (offset >= 0) {
    text += " at offset " + std::to_string(offset);
  }
  return text + ")";
}

// What a non-regular file is, in _fileio.file_kind's words and order.
const char* file_kind(mode_t mode) {
  return S_ISDIR(mode)    ? "a directory"
         : S_ISFIFO(mode) ? "a FIFO"
         : S_ISSOCK(mode) ? "a socket"
         : S_ISCHR(mode)  ? "a character device"
         : S_ISBLK(mode)  ? "a block device"
         : S_ISLNK(mode)  ? "a symbolic link"
                          : "not a regular file";
}

std::string not_regular_detail(mode_t mode, const std::string& what) {
  return ": the checkpoint's " + what + " is " + file_kind(mode) +
         ", not a regular file; refusing to use it";
}

}  // namespace

IoError::IoError(int error_number, const std::string& operation, std::string path,
                 int64_t offset)
    : std::runtime_error(describe(error_number, operation, offset) + ": " + path),
      error_number_(error_number),
      path_(std::move(path)),
      detail_(describe(error_number, operation, offset)) {}

TruncatedError::TruncatedError(std::string path, int64_t expected, int64_t actual)
    : std::runtime_error(path + " is truncated: the checkpoint needs at least " +
                         std::to_string(expected) + " bytes, the file has " +
                         std::to_string(actual)),
      path_(std::move(path)),
      expected_(expected),
      actual_(actual) {}

NotRegularFileError::NotRegularFileError(std::string path, mode_t mode, const std::string& what)
    : std::runtime_error(path + not_regular_detail(mode, what)),
      path_(std::move(path)),
      detail_(not_regular_detail(mode, what)) {}

}  // namespace dcp_native
