// File primitives of the engine: open/fsync/close that throw IoError, and
// pread/pwrite/preadv/pwritev loops that retry EINTR and resume short
// transfers, so every caller moves exactly the bytes it asked for or throws.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

namespace dcp_native {

// Most iovecs in one preadv/pwritev call (Linux IOV_MAX).
constexpr int kMaxIovecs = 1024;

// Environment variable that caps every transfer at N bytes (tests only).
constexpr const char* kShortIoEnv = "DCP_NATIVE_TEST_SHORT_IO";

// DCP_NATIVE_TEST_SHORT_IO as a byte cap: 0 when unset, empty or "0" (no
// cap); throws PlanError for anything but a non-negative integer. Read on
// every engine call so tests can set it with monkeypatch.
int64_t short_io_cap_from_env();

// O_RDONLY | O_CLOEXEC.
int open_for_read(const std::string& path);
// O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode 0644.
int open_for_write(const std::string& path);
int64_t file_size(int fd, const std::string& path);
void sync_file(int fd, const std::string& path);
// close() that reports errors: on NFS and some FUSE filesystems a failed
// write only shows up here, so writers must check it.
void close_file(int fd, const std::string& path);
void close_quietly(int fd) noexcept;

// Reads `bytes` bytes at `offset` into iov[0..count), which it consumes (the
// entries are advanced past short transfers). EOF before the end throws
// TruncatedError(path, required, size found). cap > 0 limits each syscall to
// cap bytes (DCP_NATIVE_TEST_SHORT_IO).
void read_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                const std::string& path, int64_t required, int64_t cap);
// Writes `bytes` bytes from iov[0..count) at `offset`; same conventions.
void write_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                 const std::string& path, int64_t cap);

// A file of a plan that several workers share: the first worker that needs it
// opens it, the worker that finishes its last piece closes it. Opening lazily
// keeps the number of open descriptors near the number of threads even when
// a plan touches thousands of files; anything still open when the plan ends
// (after an error) is closed by the destructor.
class SharedFile {
 public:
  SharedFile() = default;
  SharedFile(const SharedFile&) = delete;
  SharedFile& operator=(const SharedFile&) = delete;
  ~SharedFile() { close_quietly(fd_); }

  void set_pieces(int64_t pieces) noexcept {
    pieces_left_.store(pieces, std::memory_order_relaxed);
  }

  // The descriptor, calling open() (which returns a descriptor or throws) on
  // first use; concurrent callers wait for that one open.
  template <class Open>
  int acquire(Open&& open) {
    if (opened_.load(std::memory_order_acquire)) {
      return fd_;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (!opened_.load(std::memory_order_relaxed)) {
      fd_ = open();
      opened_.store(true, std::memory_order_release);
    }
    return fd_;
  }

  // True for the one caller that finished the file's last piece; it then
  // owns the descriptor through release().
  bool finish_piece() noexcept { return pieces_left_.fetch_sub(1, std::memory_order_acq_rel) == 1; }

  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  std::mutex mutex_;
  std::atomic<bool> opened_{false};
  int fd_ = -1;
  std::atomic<int64_t> pieces_left_{0};
};

// Closes a descriptor on scope exit unless release()d.
class FdGuard {
 public:
  explicit FdGuard(int fd) noexcept : fd_(fd) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() { close_quietly(fd_); }
  int get() const noexcept { return fd_; }
  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

}  // namespace dcp_native
