// File primitives of the engine: open/fsync/close that throw IoError, and
// pread/pwrite/preadv/pwritev loops that retry EINTR and resume short
// transfers, so every caller moves exactly the bytes it asked for or throws.
// Every system call here goes through the test hooks (short transfers,
// injected faults) of its engine call.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

#include "fault_injection.hpp"

namespace dcp_native {

// Most iovecs in one preadv/pwritev call (Linux IOV_MAX).
constexpr int kMaxIovecs = 1024;

// The test hooks of one engine call.
struct IoHooks {
  // > 0: every pread/pwrite/preadv/pwritev moves at most this many bytes.
  int64_t short_io_cap = 0;
  // Injected failures (DCP_NATIVE_FAULT); null for none.
  FaultInjector* faults = nullptr;

  int fault(FaultOp op) const noexcept { return faults != nullptr ? faults->next(op) : 0; }
};

// Every open of a data file goes through open_regular: a checkpoint directory
// may be hostile, and a FIFO in place of a data file would block open()
// forever, a device file would be read or written. It opens with O_NONBLOCK
// | O_CLOEXEC added to `flags` (a FIFO then opens at once for reading, or
// fails with ENXIO for writing), plus O_NOFOLLOW when writing (a save creates
// fresh names: a planted symbolic link must not redirect it), and checks
// fstat. Returns the descriptor of a regular file with O_NONBLOCK cleared
// again, or -1 with errno set when open() itself fails (EINTR retried), so the
// caller names the operation (the O_DIRECT open falls back on EINVAL). Throws
// NotRegularFileError (descriptor closed) for anything but a regular file, and
// IoError if fstat or fcntl fails. Not a hooked call: callers count the fault.
int open_regular(const std::string& path, int flags, mode_t mode);

// O_RDONLY through open_regular; IoError "open" when it fails.
int open_for_read(const std::string& path, const IoHooks& hooks);
// O_WRONLY | O_CREAT | O_TRUNC (mode 0644) through open_regular.
int open_for_write(const std::string& path, const IoHooks& hooks);
int64_t file_size(int fd, const std::string& path);
void sync_file(int fd, const std::string& path, const IoHooks& hooks);

// Starts writeback of [offset, offset + length) without waiting for it
// (sync_file_range SYNC_FILE_RANGE_WRITE on Linux; nothing elsewhere). Saves
// with fsync call it after each write, so the disk works while later pieces
// are still being written instead of all at the final fsync. Never fails.
void start_writeback(int fd, int64_t offset, int64_t length) noexcept;
// close() that reports errors: on NFS and some FUSE filesystems a failed
// write only shows up here, so writers must check it.
void close_file(int fd, const std::string& path, const IoHooks& hooks);
// close() of a file that was only read: nothing can be lost, so a failure
// (real or injected) is ignored.
void close_read_only(int fd, const IoHooks& hooks) noexcept;
// close() on error paths: not a hooked call, the descriptor must go.
void close_quietly(int fd) noexcept;

// Reads `bytes` bytes at `offset` into iov[0..count), which it consumes (the
// entries are advanced past short transfers). EOF before the end throws
// TruncatedError(path, required, size found).
void read_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                const std::string& path, int64_t required, const IoHooks& hooks);
// Writes `bytes` bytes from iov[0..count) at `offset`; same conventions.
void write_fully(int fd, iovec* iov, int count, int64_t offset, int64_t bytes,
                 const std::string& path, const IoHooks& hooks);

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

  int release() noexcept { return std::exchange(fd_, -1); }

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
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

}  // namespace dcp_native
