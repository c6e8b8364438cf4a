// System-call loops for the engine (see file_io.hpp).
#include "file_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "io_error.hpp"

namespace dcp_native {

namespace {

struct stat stat_file(int fd, const std::string& path) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    throw IoError(errno, "fstat", path);
  }
  return info;
}

int open_with(const std::string& path, int flags, mode_t mode, const IoHooks& hooks) {
  // One count per open attempt, whatever the file turns out to be.
  if (const int injected = hooks.fault(FaultOp::kOpen)) {
    throw IoError(injected, "open", path);
  }
  const int fd = open_regular(path, flags, mode);
  if (fd < 0) {
    throw IoError(errno, "open", path);
  }
  return fd;
}

enum class Direction { kRead, kWrite };

ssize_t transfer_once(Direction direction, int fd, const iovec* iov, int count, int64_t offset) {
  // One iovec is the common case (a large contiguous range): plain
  // pread/pwrite skips the kernel's iovec import.
  if (count == 1) {
    return direction == Direction::kRead ? ::pread(fd, iov->iov_base, iov->iov_len, offset)
                                         : ::pwrite(fd, iov->iov_base, iov->iov_len, offset);
  }
  return direction == Direction::kRead ? ::preadv(fd, iov, count, offset)
                                       : ::pwritev(fd, iov, count, offset);
}

const char* operation_name(Direction direction, int count) {
  return direction == Direction::kRead ? (count == 1 ? "pread" : "preadv")
                                       : (count == 1 ? "pwrite" : "pwritev");
}

void transfer_fully(Direction direction, int fd, iovec* iov, int count, int64_t offset,
                    int64_t bytes, const std::string& path, int64_t required,
                    const IoHooks& hooks) {
  const int64_t cap = hooks.short_io_cap;
  const FaultOp fault_op = direction == Direction::kRead ? FaultOp::kRead : FaultOp::kWrite;
  while (bytes > 0) {
    // The test hook trims the request to cap bytes by shortening one iovec
    // for the duration of the call.
    int use = count;
    iovec* trimmed = nullptr;
    size_t trimmed_len = 0;
    if (cap > 0 && bytes > cap) {
      size_t want = static_cast<size_t>(cap);
      size_t sum = 0;
      int i = 0;
      while (sum + iov[i].iov_len < want) {
        sum += iov[i].iov_len;
        ++i;
      }
      trimmed = &iov[i];
      trimmed_len = trimmed->iov_len;
      trimmed->iov_len = want - sum;
      use = i + 1;
    }
    // An injected fault stands for the whole call, EINTR retries included
    // (as Python's os.preadv/os.pwritev retry EINTR inside one call).
    int error = hooks.fault(fault_op);
    ssize_t done = -1;
    if (error == 0) {
      do {
        done = transfer_once(direction, fd, iov, use, offset);
        error = done < 0 ? errno : 0;
      } while (error == EINTR);
    }
    if (trimmed != nullptr) {
      trimmed->iov_len = trimmed_len;
    }
    if (done < 0) {
      throw IoError(error, operation_name(direction, use), path, offset);
    }
    if (done == 0) {
      if (direction == Direction::kWrite) {
        // pwrite may not return 0 for a non-empty request; looping would spin.
        throw IoError(EIO, operation_name(direction, use), path, offset);
      }
      // EOF: the file ends before this run. Report where it ends: the size
      // fstat sees, or the offset reached if that is smaller (files such as
      // sysfs ones report a size larger than their contents).
      int64_t size = file_size(fd, path);
      throw TruncatedError(path, required, std::min(offset, size));
    }
    bytes -= done;
    offset += done;
    // Advance past what was transferred, possibly ending inside an iovec.
    size_t left = static_cast<size_t>(done);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (left > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
}

}  // namespace

int open_regular(const std::string& path, int flags, mode_t mode) {
  flags |= O_NONBLOCK | O_CLOEXEC;
  if ((flags & O_ACCMODE) != O_RDONLY) {
    flags |= O_NOFOLLOW;
  }
  int fd = -1;
  do {
    fd = ::open(path.c_str(), flags, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    return -1;
  }
  FdGuard guard(fd);
  const mode_t kind = stat_file(fd, path).st_mode;
  if (!S_ISREG(kind)) {
    throw NotRegularFileError(path, kind, "data file");
  }
  // O_NONBLOCK means nothing for a regular file today, but cleared it cannot
  // change what later calls do. F_GETFL keeps O_DIRECT in the flags set back.
  const int status = ::fcntl(fd, F_GETFL);
  if (status < 0 || ::fcntl(fd, F_SETFL, status & ~O_NONBLOCK) != 0) {
    throw IoError(errno, "fcntl", path);
  }
  return guard.release();
}

int open_for_read(const std::string& path, const IoHooks& hooks) {
  return open_with(path, O_RDONLY, 0, hooks);
}

int open_for_write(const std::string& path, const IoHooks& hooks) {
  return open_with(path, O_WRONLY | O_CREAT | O_TRUNC, 0644, hooks);
}

int64_t file_size(int fd, const std::string& path) {
  return static_cast<int64_t>(stat_file(fd, path).st_size);
}

void sync_file(int fd, const std::string& path, const IoHooks& hooks) {
  if (const int injected = hooks.fault(FaultOp::kFsync)) {
    throw IoError(injected, "fsync", path);
  }
  while (::fsync(fd) != 0) {
    if (errno != EINTR) {
      throw IoError(errno, "fsync", path);
    }
  }
}

void start_writeback(int fd, int64_t offset, int64_t length) noexcept {
#if defined(__linux__)
  // A hint: the fsync that follows is what makes the data durable, so a
  // filesystem that refuses (EINVAL, ENOSYS, ESPIPE) changes nothing.
  (void)::sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE);
#else
  (void)fd;
  (void)offset;
  (void)length;
#endif
}

void close_file(int fd, const std::string& path, const IoHooks& hooks) {
  // Linux releases the descriptor even when close fails, so it is never
  // retried; EINTR says nothing about the data and is not an error. An
  // injected failure releases it too.
  const int injected = hooks.fault(FaultOp::kClose);
  const int error = ::close(fd) != 0 && errno != EINTR ? errno : 0;
  if (injected != 0 || error != 0) {
    throw IoError(injected != 0 ? injected : error, "close", path);
  }
}

void close_read_only(int fd, const IoHooks& hooks) noexcept {
  hooks.fault(FaultOp::kClose);  // counted like any close, and ignored like a real failure
  close_quietly(fd);
}

void close_quietly(int fd) noexcept {
  if (fd >= 0) {
    ::close(fd);
  }
}

void read_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                const std::string& path, int64_t required, const IoHooks& hooks) {
  transfer_fully(Direction::kRead, fd, iov, count, offset, bytes, path, required, hooks);
}

void write_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                 const std::string& path, const IoHooks& hooks) {
  transfer_fully(Direction::kWrite, fd, iov, count, offset, bytes, path, 0, hooks);
}

}  // namespace dcp_native
