// CRC32C (Castagnoli; reflected, initial value and final xor 0xFFFFFFFF, so
// crc32c("123456789") == 0xE3069283), the checksum of checkpoint payloads.
// The hardware implementation (SSE4.2 on x86-64, the ARMv8 CRC instructions
// on AArch64) is chosen at run time: the module is built for the baseline
// ISA and must run on CPUs without these instructions, where a portable
// slicing-by-8 implementation takes over.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dcp_native {

// The checksum of `length` bytes at `data` continuing `crc`, the checksum of
// the bytes before them (0 for none): crc32c(b, m, crc32c(a, n)) is the
// checksum of a followed by b.
using Crc32cFunction = uint32_t (*)(const void* data, size_t length, uint32_t crc) noexcept;

// The fastest implementation this CPU supports, or the portable
// slicing-by-8 one (any CPU, about 1-2 GB/s) when `portable` (tests and
// benchmarks compare the two on machines with the instructions;
// DCP_NATIVE_CRC32C, see dcp_native/config.py), and its name
// ("sse4.2+avx512-vpclmul", "sse4.2+pclmul", "sse4.2", "armv8" or
// "portable").
Crc32cFunction crc32c_select(bool portable, const char** name = nullptr) noexcept;

// One hardware implementation by name, null where the CPU lacks it (tests
// check each on every length, whichever the CPU makes the fastest):
// "instruction" (the CRC instruction alone, three interleaved streams; ARM's
// fastest), "fold128" (PCLMULQDQ folding) and "fold512" (AVX-512 VPCLMULQDQ).
Crc32cFunction crc32c_variant(const char* name) noexcept;

// The CRC32C of a followed by b, from crc_a = crc32c(a), crc_b = crc32c(b)
// and the length of b (zlib's crc32_combine for the Castagnoli polynomial):
// lets pieces of one block be checksummed apart, on different threads.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) noexcept;

}  // namespace dcp_native
