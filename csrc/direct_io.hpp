// O_DIRECT transfers for the pieces that go through pinned buffers: they are
// page-aligned in memory and, for payloads (4 KiB-aligned in the file), in
// the file too, so the page cache can be skipped. Each file of a call gets a
// second descriptor opened with O_DIRECT beside its normal one; a refusal
// (EINVAL on the open; EINVAL, EFAULT or EOPNOTSUPP on the file's first
// transfer) makes that file fall back to buffered I/O silently.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "file_io.hpp"

namespace dcp_native {

// Test hook (DCP_NATIVE_TEST_NO_DIRECT, see dcp_native/config.py): the
// O_DIRECT open, or every O_DIRECT transfer, fails with EINVAL as on a
// filesystem without O_DIRECT support (tmpfs accepts it on recent kernels, so
// the fallback needs a hook to be tested). In the order config.py numbers them.
enum class DirectRefusal { kNone, kOpen, kTransfer };

// Bytes moved with O_DIRECT by this process so far (tests: evidence that the
// direct path ran, or did not).
int64_t direct_io_bytes() noexcept;

// O_DIRECT and the page size: pinned buffers, their size and aligned file
// pieces are multiples of it.
constexpr int64_t kPageBytes = 4096;

// Whether a call may use O_DIRECT at all: asked for, and the short-transfer
// test hook (if set) keeps transfers page-aligned.
inline bool direct_allowed(bool direct_io, const IoHooks& hooks) noexcept {
  return direct_io && hooks.short_io_cap % kPageBytes == 0;
}

class DirectFile {
 public:
  DirectFile() = default;
  DirectFile(const DirectFile&) = delete;
  DirectFile& operator=(const DirectFile&) = delete;
  ~DirectFile() { close_quietly(fd_); }

  // Moves `bytes` at `offset` between the file and `buffer` (pinned, so
  // page-aligned): its whole pages with O_DIRECT when `use_direct`, `offset`
  // is page-aligned and the file accepts O_DIRECT, the rest through `fd`, the
  // normal descriptor, which must already be open (for writes it created and
  // truncated the file). Failures throw IoError, a file that is no longer
  // regular NotRegularFileError (both opens go through open_regular, so a
  // FIFO swapped in between them cannot block).
  void write(int fd, bool use_direct, const char* buffer, int64_t offset, int64_t bytes,
             const std::string& path, const IoHooks& hooks, DirectRefusal refusal);
  void read(int fd, bool use_direct, char* buffer, int64_t offset, int64_t bytes,
            const std::string& path, int64_t required, const IoHooks& hooks,
            DirectRefusal refusal);

  // Closes the descriptor (the file's last piece is done).
  void close() noexcept;

 private:
  int open_once(const std::string& path, bool for_write, DirectRefusal refusal);
  // move(fd, buffer, offset, bytes) moves the O_DIRECT part through the
  // O_DIRECT descriptor, then the rest through `fd`.
  template <class Move>
  void transfer(int fd, bool use_direct, bool for_write, char* buffer, int64_t offset,
                int64_t bytes, const std::string& path, DirectRefusal refusal, Move&& move);

  std::mutex mutex_;
  int state_ = 0;  // 0: not tried, 1: open, 2: unavailable
  int fd_ = -1;
  std::atomic<bool> succeeded_{false};
};

}  // namespace dcp_native
