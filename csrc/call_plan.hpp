// Packs the byte ranges of one file into system calls: ranges contiguous in
// the file share a preadv/pwritev of at most kMaxIovecs iovecs and
// chunk_bytes bytes, filled greedily, so a long range is split across calls
// and a call is only cut short by a discontinuity or a limit. Both engines
// must pack identically: the read stats (bytes, calls) are part of the
// contract. dcp_native/_engine_python.py mirrors this class line for line.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "file_io.hpp"

namespace dcp_native {

// One preadv/pwritev call: `bytes` bytes at `offset` of file `file`, through
// iovecs [first_iov, first_iov + iov_count) of the plan's iovec table. A call
// with no iovecs only opens its file (for files with nothing to transfer).
struct IoCall {
  size_t file;
  int64_t offset;
  int64_t bytes;
  size_t first_iov;
  int iov_count;
};

class CallBuilder {
 public:
  // `tags` (optional) receives one value per iovec: the tag given to add(),
  // -1 for gaps.
  CallBuilder(std::vector<iovec>& iovs, std::vector<IoCall>& calls, int64_t chunk_bytes,
              std::vector<int64_t>* tags = nullptr) noexcept
      : iovs_(iovs), calls_(calls), chunk_bytes_(chunk_bytes), tags_(tags) {}

  void begin_file(size_t file) noexcept {
    file_ = file;
    file_first_call_ = calls_.size();
    open_ = false;
  }

  // Closes the last call; a file without any gets an empty call so that it is
  // still opened (created for writes, size-checked for reads).
  void end_file() {
    flush();
    if (calls_.size() == file_first_call_) {
      calls_.push_back(IoCall{file_, 0, 0, iovs_.size(), 0});
    }
  }

  bool empty() const noexcept { return !open_; }
  // File offset just past the open call.
  int64_t end() const noexcept { return call_.offset + call_.bytes; }

  // Whether the open call has room for a gap of `gap` bytes and at least one
  // more byte (and iovec) of data after it.
  bool can_extend(int64_t gap) const noexcept {
    int needed = (gap > 0 ? 1 : 0) + 1;
    return call_.iov_count + needed <= kMaxIovecs && gap < chunk_bytes_ - call_.bytes;
  }

  // Appends `length` bytes at file `offset` to/from `memory`, continuing the
  // open call when it ends at `offset` and has room, splitting at the limits.
  // A null `memory` is a gap: its iovec's base is replaced by the worker's
  // scratch when the call runs.
  void add(int64_t offset, char* memory, int64_t length, int64_t tag = -1) {
    while (length > 0) {
      if (open_ &&
          (call_.iov_count == kMaxIovecs || call_.bytes == chunk_bytes_ || end() != offset)) {
        flush();
      }
      if (!open_) {
        call_ = IoCall{file_, offset, 0, iovs_.size(), 0};
        open_ = true;
      }
      int64_t take = std::min(length, chunk_bytes_ - call_.bytes);
      iovs_.push_back(iovec{memory, static_cast<size_t>(take)});
      if (tags_ != nullptr) {
        tags_->push_back(tag);
      }
      ++call_.iov_count;
      call_.bytes += take;
      offset += take;
      memory = memory != nullptr ? memory + take : nullptr;
      length -= take;
    }
  }

  void flush() {
    if (open_) {
      calls_.push_back(call_);
      open_ = false;
    }
  }

 private:
  std::vector<iovec>& iovs_;
  std::vector<IoCall>& calls_;
  int64_t chunk_bytes_;
  std::vector<int64_t>* tags_;
  size_t file_ = 0;
  size_t file_first_call_ = 0;
  bool open_ = false;
  IoCall call_{0, 0, 0, 0, 0};
};

// Reorders calls (grouped by file, in file order) so that workers spread over
// files: files are taken in waves of `wave`, and within a wave the files'
// calls alternate (first call of each, then second of each, ...). Threads
// writing to one file contend for its inode lock, so handing them the same
// file's chunks serialises them; waves keep the number of open files near the
// thread count for plans of thousands of files.
inline std::vector<IoCall> interleave_files(const std::vector<IoCall>& calls, size_t file_count,
                                            size_t wave) {
  std::vector<size_t> first(file_count + 1, 0);
  for (const IoCall& call : calls) {
    ++first[call.file + 1];
  }
  for (size_t f = 0; f < file_count; ++f) {
    first[f + 1] += first[f];
  }
  std::vector<IoCall> out;
  out.reserve(calls.size());
  wave = std::max<size_t>(wave, 1);
  for (size_t start = 0; start < file_count; start += wave) {
    const size_t stop = std::min(file_count, start + wave);
    for (size_t round = 0;; ++round) {
      bool any = false;
      for (size_t f = start; f < stop; ++f) {
        if (first[f] + round < first[f + 1]) {
          out.push_back(calls[first[f] + round]);
          any = true;
        }
      }
      if (!any) {
        break;
      }
    }
  }
  return out;
}

// One SharedFile per file of a plan, each expecting as many pieces as the
// plan has work items (calls, device pieces: anything with a `file`) for it.
template <class Item>
std::unique_ptr<SharedFile[]> share_files(size_t file_count, const std::vector<Item>& items) {
  std::unique_ptr<SharedFile[]> files(new SharedFile[file_count]);
  std::vector<int64_t> pieces(file_count, 0);
  for (const Item& item : items) {
    ++pieces[item.file];
  }
  for (size_t f = 0; f < file_count; ++f) {
    files[f].set_pieces(pieces[f]);
  }
  return files;
}

}  // namespace dcp_native
