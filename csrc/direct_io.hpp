// O_DIRECT transfers for the pieces that go through pinned buffers: they are
// page-aligned in memory and, for payloads (4 KiB-aligned in the file), in
// the file too, so the page cache can be skipped. Each file of a call gets a
// second descriptor opened with O_DIRECT beside its normal one; a filesystem
// that refuses it (EINVAL on the open or on the first transfer) makes that
// file fall back to buffered I/O silently.
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

// Whether a call may use O_DIRECT at all: asked for, and the short-transfer
// test hook (if set) keeps transfers page-aligned.
inline bool direct_allowed(bool direct_io, const IoHooks& hooks) noexcept {
  return direct_io && hooks.short_io_cap % 4096 == 0;
}

class DirectFile {
 public:
  DirectFile() = default;
  DirectFile(const DirectFile&) = delete;
  DirectFile& operator=(const DirectFile&) = delete;
  ~DirectFile() { close_quietly(fd_); }

  // Transfers `bytes` (page multiple) at `offset` (page-aligned) from/to
  // `buffer` (page-aligned) with O_DIRECT. False when the file cannot use
  // O_DIRECT (nothing transferred: the caller uses its buffered descriptor);
  // other failures throw IoError, a file that is no longer regular
  // NotRegularFileError (both opens go through open_regular, so a FIFO
  // swapped in between them cannot block). The normal descriptor must already
  // be open (for writes it created and truncated the file).
  bool write(const std::string& path, const char* buffer, int64_t bytes, int64_t offset,
             const IoHooks& hooks, DirectRefusal refusal);
  bool read(const std::string& path, char* buffer, int64_t bytes, int64_t offset,
            int64_t required, const IoHooks& hooks, DirectRefusal refusal);

  // Closes the descriptor (the file's last piece is done).
  void close() noexcept;

 private:
  int open_once(const std::string& path, bool for_write, DirectRefusal refusal);
  template <class Transfer>
  bool run(const std::string& path, bool for_write, int64_t bytes, DirectRefusal refusal,
           Transfer&& transfer);

  std::mutex mutex_;
  int state_ = 0;  // 0: not tried, 1: open, 2: unavailable
  int fd_ = -1;
  std::atomic<bool> succeeded_{false};
};

}  // namespace dcp_native
