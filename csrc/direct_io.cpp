// O_DIRECT descriptors with a silent fallback (see direct_io.hpp).
#include "direct_io.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "io_error.hpp"

namespace dcp_native {

namespace {

std::atomic<int64_t> g_direct_bytes{0};

}  // namespace

int64_t direct_io_bytes() noexcept { return g_direct_bytes.load(std::memory_order_relaxed); }

int DirectFile::open_once(const std::string& path, bool for_write, DirectRefusal refusal) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (state_ == 0) {
    state_ = 2;
    if (refusal != DirectRefusal::kOpen) {
      // open_regular adds O_NONBLOCK, O_CLOEXEC and (writing) O_NOFOLLOW, and
      // throws NotRegularFileError for a file that is not regular.
      const int fd = open_regular(path, (for_write ? O_WRONLY : O_RDONLY) | O_DIRECT, 0);
      if (fd >= 0) {
        fd_ = fd;
        state_ = 1;
      } else if (errno != EINVAL) {
        throw IoError(errno, "open (O_DIRECT)", path);
      }
    }
  }
  return state_ == 1 ? fd_ : -1;
}

template <class Transfer>
bool DirectFile::run(const std::string& path, bool for_write, int64_t bytes,
                     DirectRefusal refusal, Transfer&& transfer) {
  const int fd = open_once(path, for_write, refusal);
  if (fd < 0) {
    return false;
  }
  // Only a refusal before any transfer of the file worked is the
  // filesystem's answer to O_DIRECT; a later EINVAL is a real error.
  const bool first = !succeeded_.load(std::memory_order_acquire);
  try {
    // The hook stands for a filesystem that refuses every O_DIRECT transfer.
    if (refusal == DirectRefusal::kTransfer) {
      throw IoError(EINVAL, for_write ? "pwrite (O_DIRECT)" : "pread (O_DIRECT)", path);
    }
    transfer(fd);
  } catch (const IoError& error) {
    if (error.error_number() != EINVAL || !first) {
      throw;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    state_ = 2;  // the descriptor stays open until close(): another thread may use it
    return false;
  }
  succeeded_.store(true, std::memory_order_release);
  g_direct_bytes.fetch_add(bytes, std::memory_order_relaxed);
  return true;
}

bool DirectFile::write(const std::string& path, const char* buffer, int64_t bytes,
                       int64_t offset, const IoHooks& hooks, DirectRefusal refusal) {
  return run(path, true, bytes, refusal, [&](int fd) {
    // pwritev never writes through its iovecs; the cast only fits iovec.
    iovec iov{const_cast<char*>(buffer), static_cast<size_t>(bytes)};
    write_fully(fd, &iov, 1, offset, bytes, path, hooks);
  });
}

bool DirectFile::read(const std::string& path, char* buffer, int64_t bytes, int64_t offset,
                      int64_t required, const IoHooks& hooks, DirectRefusal refusal) {
  return run(path, false, bytes, refusal, [&](int fd) {
    iovec iov{buffer, static_cast<size_t>(bytes)};
    read_fully(fd, &iov, 1, offset, bytes, path, required, hooks);
  });
}

void DirectFile::close() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  close_quietly(fd_);
  fd_ = -1;
  state_ = 2;
}

}  // namespace dcp_native
