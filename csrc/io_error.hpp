// Exceptions thrown by the native engine. bindings.cpp turns IoError into the
// OSError subclass its errno selects, TruncatedError into
// dcp_native.TruncatedFileError, NotRegularFileError into
// dcp_native.CorruptCheckpointError and PlanError into ValueError; nothing in
// csrc prints an error instead of throwing it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dcp_native {

// A failed system call on a file: what failed, on which file, and where.
class IoError : public std::runtime_error {
 public:
  // offset < 0 means the operation has no file offset (open, fsync, close).
  IoError(int error_number, const std::string& operation, std::string path,
          int64_t offset = -1);

  int error_number() const noexcept { return error_number_; }
  const std::string& path() const noexcept { return path_; }
  // The OS message with the operation and offset, without the path: Python's
  // OSError prints the path itself from its filename attribute.
  const std::string& detail() const noexcept { return detail_; }

 private:
  int error_number_;
  std::string path_;
  std::string detail_;
};

// A file ends before the bytes a read plan needs from it.
class TruncatedError : public std::runtime_error {
 public:
  TruncatedError(std::string path, int64_t expected, int64_t actual);

  const std::string& path() const noexcept { return path_; }
  int64_t expected() const noexcept { return expected_; }
  int64_t actual() const noexcept { return actual_; }

 private:
  std::string path_;
  int64_t expected_;
  int64_t actual_;
};

// A path the engine opened is not a regular file (a FIFO, a directory, a
// device, ...): a hostile or damaged checkpoint directory. The message is
// dcp_native._fileio.not_regular's, word for word, so both engines raise the
// same error.
class NotRegularFileError : public std::runtime_error {
 public:
  // `mode` is fstat's st_mode; `what` names the file ("data file").
  NotRegularFileError(std::string path, mode_t mode, const std::string& what);

  const std::string& path() const noexcept { return path_; }
  // The message after the path (": the checkpoint's data file is a FIFO, ..."),
  // so that bindings.cpp can put the path in front decoded as Python decodes it.
  const std::string& detail() const noexcept { return detail_; }

 private:
  std::string path_;
  std::string detail_;
};

// A malformed plan (bad record lengths, negative sizes, overflowing ranges).
// Derives from std::invalid_argument, which pybind11 maps to ValueError.
class PlanError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace dcp_native
