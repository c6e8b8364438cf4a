// O_DIRECT descriptors with a silent fallback (see direct_io.hpp).
#include "direct_io.hpp"

#include <fcntl.h>

#include <cerrno>

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

template <class Move>
void DirectFile::transfer(int fd, bool use_direct, bool for_write, char* buffer, int64_t offset,
                          int64_t bytes, const std::string& path, DirectRefusal refusal,
                          Move&& move) {
  int64_t done = use_direct && offset % kPageBytes == 0 ? bytes / kPageBytes * kPageBytes : 0;
  const int direct_fd = done > 0 ? open_once(path, for_write, refusal) : -1;
  if (direct_fd < 0) {
    done = 0;
  } else {
    // Only a refusal before any transfer of the file worked is the answer to
    // O_DIRECT itself; a later one is a real error.
    const bool first = !succeeded_.load(std::memory_order_acquire);
    try {
      // The hook stands for a filesystem that refuses every O_DIRECT transfer.
      if (refusal == DirectRefusal::kTransfer) {
        throw IoError(EINVAL, for_write ? "pwrite (O_DIRECT)" : "pread (O_DIRECT)", path);
      }
      move(direct_fd, buffer, offset, done);
      succeeded_.store(true, std::memory_order_release);
      g_direct_bytes.fetch_add(done, std::memory_order_relaxed);
    } catch (const IoError& error) {
      // EINVAL: alignment or no O_DIRECT support; EFAULT: the kernel cannot
      // pin the buffer's pages for the transfer; EOPNOTSUPP: the filesystem.
      const int e = error.error_number();
      if ((e != EINVAL && e != EFAULT && e != EOPNOTSUPP) || !first) {
        throw;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      state_ = 2;  // the descriptor stays open until close(): another thread may use it
      done = 0;
    }
  }
  if (done < bytes) {
    move(fd, buffer + done, offset + done, bytes - done);
  }
}

void DirectFile::write(int fd, bool use_direct, const char* buffer, int64_t offset,
                       int64_t bytes, const std::string& path, const IoHooks& hooks,
                       DirectRefusal refusal) {
  // pwritev never writes through its iovecs; the cast only fits iovec.
  transfer(fd, use_direct, true, const_cast<char*>(buffer), offset, bytes, path, refusal,
           [&](int to, char* from, int64_t at, int64_t length) {
             iovec iov{from, static_cast<size_t>(length)};
             write_fully(to, &iov, 1, at, length, path, hooks);
           });
}

void DirectFile::read(int fd, bool use_direct, char* buffer, int64_t offset, int64_t bytes,
                      const std::string& path, int64_t required, const IoHooks& hooks,
                      DirectRefusal refusal) {
  transfer(fd, use_direct, false, buffer, offset, bytes, path, refusal,
           [&](int from, char* to, int64_t at, int64_t length) {
             iovec iov{to, static_cast<size_t>(length)};
             read_fully(from, &iov, 1, at, length, path, required, hooks);
           });
}

void DirectFile::close() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  close_quietly(fd_);
  fd_ = -1;
  state_ = 2;
}

}  // namespace dcp_native
