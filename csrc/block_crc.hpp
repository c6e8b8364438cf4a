// The one checksum mechanism ("Checksums: one mechanism" in docs/ARCHITECTURE.md):
// block CRC32Cs from ranges checksummed by the thread that moves their bytes,
// the pieces of blocks that ranges share joined with crc32c_combine.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "crc32c.hpp"

namespace dcp_native {

// A file divided into blocks: block k is [k * block, min((k + 1) * block, size)).
struct BlockGrid {
  int64_t block = 0;  // 0: the file has no checksums
  int64_t size = 0;

  int64_t blocks() const noexcept { return block > 0 ? size / block + (size % block != 0) : 0; }
  int64_t length(int64_t k) const noexcept { return std::min(block, size - k * block); }
};

// The part [start, start + length) of block `block` one range holds, and its CRC.
struct BlockPiece {
  int64_t block;
  int64_t start;
  int64_t length;
  uint32_t crc;
};

// Checksums the bytes [offset, offset + bytes) of a file, held in order by
// `iovs`: whole(k, crc) for every block the range holds whole; the pieces of
// the blocks it holds in part go to pieces[0..n), n (<= 2) is returned.
template <class Whole>
int checksum_range(const BlockGrid& grid, int64_t offset, int64_t bytes, const iovec* iovs,
                   Crc32cFunction crc32c, Whole&& whole, BlockPiece pieces[2]) {
  int count = 0;
  const int64_t end = offset + bytes;
  const char* memory = static_cast<const char*>(iovs->iov_base);
  int64_t left = static_cast<int64_t>(iovs->iov_len);
  for (int64_t pos = offset; pos < end;) {
    const int64_t k = pos / grid.block;
    const int64_t block_start = k * grid.block;
    const int64_t stop = std::min(end, block_start + grid.length(k));
    uint32_t crc = 0;
    for (int64_t need = stop - pos; need > 0;) {
      while (left == 0) {
        ++iovs;
        memory = static_cast<const char*>(iovs->iov_base);
        left = static_cast<int64_t>(iovs->iov_len);
      }
      const int64_t take = std::min(need, left);
      crc = crc32c(memory, static_cast<size_t>(take), crc);
      memory += take;
      left -= take;
      need -= take;
    }
    if (pos == block_start && stop == block_start + grid.length(k)) {
      whole(k, crc);
    } else {
      pieces[count++] = BlockPiece{k, pos - block_start, stop - pos, crc};
    }
    pos = stop;
  }
  return count;
}

// Joins pieces (in any order) into the CRCs of the blocks they tile:
// done(k, crc) once per block. Pieces of one block may come from several
// ranges that each tile it (reads of overlapping runs): any chain from the
// block's start to its end holds the block's bytes, and the first one found
// is used. A block the pieces do not tile is a bug of the caller's plan.
template <class Done>
void join_pieces(std::vector<BlockPiece>& pieces, const BlockGrid& grid, Done&& done) {
  std::sort(pieces.begin(), pieces.end(), [](const BlockPiece& a, const BlockPiece& b) {
    return std::tie(a.block, a.start, a.length) < std::tie(b.block, b.start, b.length);
  });
  for (size_t first = 0; first < pieces.size();) {
    const int64_t k = pieces[first].block;
    size_t stop = first;
    while (stop < pieces.size() && pieces[stop].block == k) {
      ++stop;
    }
    const int64_t length = grid.length(k);
    int64_t pos = 0;
    uint32_t crc = 0;
    for (size_t i = first; i < stop && pos < length; ++i) {
      if (pieces[i].start == pos) {
        crc = pos == 0 ? pieces[i].crc
                       : crc32c_combine(crc, pieces[i].crc, static_cast<uint64_t>(pieces[i].length));
        pos += pieces[i].length;
      }
    }
    if (pos != length) {
      throw std::logic_error("block " + std::to_string(k) + " is not covered by its pieces");
    }
    done(k, crc);
    first = stop;
  }
}

}  // namespace dcp_native
