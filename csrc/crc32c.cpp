// CRC32C implementations and their run-time dispatch (see crc32c.hpp).
//
// The hardware path follows Mark Adler's crc32c.c: the CRC instruction has a
// latency of about three cycles and a throughput of one per cycle, so a
// single dependency chain runs at a third of the possible speed. Long inputs
// are therefore cut into three adjacent streams that are checksummed
// together, and the three results are joined by "shifting" a CRC over the
// bytes that follow it: appending n zero bytes to a raw CRC state is a
// multiplication by x^(8n) modulo the polynomial, which four 256-entry tables
// per n turn into four lookups.
#include "crc32c.hpp"

#include <array>
#include <string>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#include <immintrin.h>
#include <wmmintrin.h>
#define DCP_NATIVE_CRC32C_TARGET __attribute__((target("sse4.2")))
#elif defined(__aarch64__) && defined(__linux__)
#include <arm_acle.h>
#include <sys/auxv.h>
#if defined(__clang__)
#define DCP_NATIVE_CRC32C_TARGET __attribute__((target("crc")))
#else
#define DCP_NATIVE_CRC32C_TARGET __attribute__((target("+crc")))
#endif
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)  // asm/hwcap.h, absent from old sys/auxv.h
#endif
#endif

namespace dcp_native {

namespace {

// The Castagnoli polynomial 0x1EDC6F41, bit-reversed: bit 31 holds x^0.
constexpr uint32_t kPolynomial = 0x82F63B78u;

using ByteTables = std::array<std::array<uint32_t, 256>, 8>;
using ShiftTables = std::array<std::array<uint32_t, 256>, 4>;

// tables[k][b]: the raw CRC of byte b followed by k zero bytes.
constexpr ByteTables make_byte_tables() {
  ByteTables tables{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 1) != 0 ? (crc >> 1) ^ kPolynomial : crc >> 1;
    }
    tables[0][b] = crc;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (size_t b = 0; b < 256; ++b) {
      const uint32_t previous = tables[k - 1][b];
      tables[k][b] = (previous >> 8) ^ tables[0][previous & 0xFF];
    }
  }
  return tables;
}

constexpr ByteTables kByteTables = make_byte_tables();

// a * b modulo the polynomial, both bit-reversed.
constexpr uint32_t multiply_mod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if ((a & (0x80000000u >> i)) != 0) {
      product ^= b;
    }
    b = (b & 1) != 0 ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

// x^(8 * bytes) modulo the polynomial: the operator that appends `bytes` zero
// bytes to a raw CRC state.
constexpr uint32_t zeros_operator(uint64_t bytes) {
  uint32_t result = 0x80000000u;  // x^0
  uint32_t power = 0x00800000u;   // x^8, squared as the bits of `bytes` go by
  for (; bytes != 0; bytes >>= 1) {
    if ((bytes & 1) != 0) {
      result = multiply_mod(power, result);
    }
    power = multiply_mod(power, power);
  }
  return result;
}

// The operator as tables: the state is the xor of its four bytes, each
// multiplied separately.
constexpr ShiftTables make_shift_tables(uint64_t bytes) {
  const uint32_t op = zeros_operator(bytes);
  ShiftTables tables{};
  for (uint32_t k = 0; k < 4; ++k) {
    for (uint32_t b = 0; b < 256; ++b) {
      tables[k][b] = multiply_mod(op, b << (8 * k));
    }
  }
  return tables;
}

[[maybe_unused]] inline uint32_t shift(const ShiftTables& tables, uint32_t crc) noexcept {
  return tables[0][crc & 0xFF] ^ tables[1][(crc >> 8) & 0xFF] ^ tables[2][(crc >> 16) & 0xFF] ^
         tables[3][crc >> 24];
}

inline uint64_t load_le64(const unsigned char* p) noexcept {
  uint64_t word;
  std::memcpy(&word, p, sizeof(word));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  word = __builtin_bswap64(word);
#endif
  return word;
}

#if defined(DCP_NATIVE_CRC32C_TARGET)

// Stream lengths of the three-way loops: long streams while at least three
// fit, then short ones, then one stream. Adler's values: the join costs two
// shifts (about 20 cycles) per 3 * kShortStream bytes, a few percent.
constexpr size_t kLongStream = 8192;
constexpr size_t kShortStream = 256;
constexpr ShiftTables kLongShift = make_shift_tables(kLongStream);
constexpr ShiftTables kShortShift = make_shift_tables(kShortStream);

// The states are 64-bit so that the dependency chains hold nothing but the
// CRC instructions (no zero-extending moves between them).
#if defined(__x86_64__)
DCP_NATIVE_CRC32C_TARGET inline uint64_t step8(uint64_t crc, const unsigned char* p) noexcept {
  return _mm_crc32_u64(crc, load_le64(p));
}
DCP_NATIVE_CRC32C_TARGET inline uint32_t step1(uint32_t crc, unsigned char byte) noexcept {
  return _mm_crc32_u8(crc, byte);
}
const char* const kHardwareName = "sse4.2";
bool cpu_has_crc32c() noexcept {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_SSE4_2) != 0;
}
#else
DCP_NATIVE_CRC32C_TARGET inline uint64_t step8(uint64_t crc, const unsigned char* p) noexcept {
  return __crc32cd(static_cast<uint32_t>(crc), load_le64(p));
}
DCP_NATIVE_CRC32C_TARGET inline uint32_t step1(uint32_t crc, unsigned char byte) noexcept {
  return __crc32cb(crc, byte);
}
const char* const kHardwareName = "armv8";
bool cpu_has_crc32c() noexcept { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#endif

// While at least three streams of `stream` bytes are left: the three
// adjacent streams from `next`, joined into `crc` (next and length advance).
DCP_NATIVE_CRC32C_TARGET inline uint32_t three_streams(uint32_t crc, const unsigned char*& next,
                                                       size_t& length, size_t stream,
                                                       const ShiftTables& tables) noexcept {
  for (; length >= 3 * stream; length -= 3 * stream) {
    uint64_t crc0 = crc;
    uint64_t crc1 = 0;
    uint64_t crc2 = 0;
    const unsigned char* const end = next + stream;
    do {
      crc0 = step8(crc0, next);
      crc1 = step8(crc1, next + stream);
      crc2 = step8(crc2, next + 2 * stream);
      next += 8;
    } while (next < end);
    next += 2 * stream;
    const uint32_t joined =
        shift(tables, static_cast<uint32_t>(crc0)) ^ static_cast<uint32_t>(crc1);
    crc = shift(tables, joined) ^ static_cast<uint32_t>(crc2);
  }
  return crc;
}

DCP_NATIVE_CRC32C_TARGET uint32_t crc32c_hardware(const void* data, size_t length,
                                                  uint32_t crc) noexcept {
  const unsigned char* next = static_cast<const unsigned char*>(data);
  uint32_t state = ~crc;
  // Aligned 8-byte loads never straddle a cache line.
  while (length > 0 && (reinterpret_cast<uintptr_t>(next) & 7) != 0) {
    state = step1(state, *next++);
    --length;
  }
  state = three_streams(state, next, length, kLongStream, kLongShift);
  state = three_streams(state, next, length, kShortStream, kShortShift);
  uint64_t state64 = state;
  for (; length >= 8; length -= 8, next += 8) {
    state64 = step8(state64, next);
  }
  state = static_cast<uint32_t>(state64);
  for (; length > 0; --length) {
    state = step1(state, *next++);
  }
  return ~state;
}

#if defined(__x86_64__)
// Folding with carry-less multiplication (PCLMULQDQ), several times the
// speed of the CRC instruction: a 128-bit chunk V of the message d bytes
// before the end of the next chunk contributes V * x^(8d), and with V = A *
// x^64 + B (A: its first 8 bytes), V * x^(8d) = A * (x^(64+8d) mod P) + B *
// (x^(8d) mod P) modulo P: two 64x33-bit products that fit the next chunk's
// 128 bits, so four accumulators fold 64 bytes at a time and then into one.
// The last 128 bits V give the state V * x^32 mod P, which is what the CRC
// instruction computes from a zero state over V's 16 bytes.
#define DCP_NATIVE_CRC32C_FOLD_TARGET __attribute__((target("sse4.2,pclmul")))

// A fold constant: x^(8 * bytes - 1) mod P, bit-reflected in a 64-bit
// operand (bit 63 - e holds x^e). The product of two such 64-bit operands
// lands one bit short of the 128-bit frame of a loaded chunk, which is the
// missing factor x.
constexpr long long fold_constant(uint64_t bytes) {
  constexpr uint32_t kX7 = 0x01000000u;  // x^7, bit-reflected
  return static_cast<long long>(uint64_t{multiply_mod(zeros_operator(bytes - 1), kX7)} << 32);
}

DCP_NATIVE_CRC32C_FOLD_TARGET inline __m128i fold(__m128i v, __m128i k, __m128i next) noexcept {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(v, k, 0x00), _mm_clmulepi64_si128(v, k, 0x11)),
                       next);
}

DCP_NATIVE_CRC32C_FOLD_TARGET inline __m128i load128(const unsigned char* p) noexcept {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Folds four adjacent 16-byte accumulators into one, then the `length`
// bytes left at `next` (whole 16-byte chunks, then the CRC instruction), and
// returns the finished CRC.
DCP_NATIVE_CRC32C_FOLD_TARGET uint32_t finish_folding(__m128i x0, __m128i x1, __m128i x2, __m128i x3,
                                                      const unsigned char* next, size_t length) noexcept {
  const __m128i by16 = _mm_set_epi64x(fold_constant(16), fold_constant(24));
  __m128i x = fold(fold(fold(x0, by16, x1), by16, x2), by16, x3);
  for (; length >= 16; length -= 16, next += 16) {
    x = fold(x, by16, load128(next));
  }
  uint64_t state = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(x)));
  state = _mm_crc32_u64(state, static_cast<uint64_t>(_mm_extract_epi64(x, 1)));
  uint32_t state32 = static_cast<uint32_t>(state);
  for (; length > 0; --length) {
    state32 = step1(state32, *next++);
  }
  return ~state32;
}

DCP_NATIVE_CRC32C_FOLD_TARGET uint32_t crc32c_folding(const void* data, size_t length,
                                                      uint32_t crc) noexcept {
  if (length < 256) {
    return crc32c_hardware(data, length, crc);
  }
  const unsigned char* next = static_cast<const unsigned char*>(data);
  // The state enters as a xor into the first 32 bits of the message.
  __m128i x0 = _mm_xor_si128(load128(next), _mm_cvtsi32_si128(static_cast<int>(~crc)));
  __m128i x1 = load128(next + 16);
  __m128i x2 = load128(next + 32);
  __m128i x3 = load128(next + 48);
  next += 64;
  length -= 64;
  const __m128i by64 = _mm_set_epi64x(fold_constant(64), fold_constant(72));
  for (; length >= 64; length -= 64, next += 64) {
    x0 = fold(x0, by64, load128(next));
    x1 = fold(x1, by64, load128(next + 16));
    x2 = fold(x2, by64, load128(next + 32));
    x3 = fold(x3, by64, load128(next + 48));
  }
  return finish_folding(x0, x1, x2, x3, next, length);
}

// The same folding, 256 bytes a step, with AVX-512 carry-less multiplication
// (four 128-bit lanes per instruction); the last 64 bytes of accumulators go
// through the 128-bit path above.
#define DCP_NATIVE_CRC32C_FOLD512_TARGET \
  __attribute__((target("sse4.2,pclmul,avx512f,avx512vl,vpclmulqdq")))

DCP_NATIVE_CRC32C_FOLD512_TARGET inline __m512i fold512(__m512i v, __m512i k, __m512i next) noexcept {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(v, k, 0x00),
                                   _mm512_clmulepi64_epi128(v, k, 0x11), next, 0x96);  // a ^ b ^ c
}

DCP_NATIVE_CRC32C_FOLD512_TARGET inline __m512i load(const unsigned char* p) noexcept {
  return _mm512_loadu_si512(p);
}

// The pair of fold constants in each 128-bit lane (the low one multiplies the lane's low half).
DCP_NATIVE_CRC32C_FOLD512_TARGET inline __m512i lanes(long long high, long long low) noexcept {
  return _mm512_set_epi64(high, low, high, low, high, low, high, low);
}

DCP_NATIVE_CRC32C_FOLD512_TARGET uint32_t crc32c_folding512(const void* data, size_t length,
                                                            uint32_t crc) noexcept {
  if (length < 1024) {
    return crc32c_folding(data, length, crc);
  }
  const unsigned char* next = static_cast<const unsigned char*>(data);
  // (No _mm512_zextsi128_si512, _mm512_broadcast_i32x4 or _mm512_extracti32x4_epi32:
  // GCC 12 warns that their undefined inputs may be used.)
  __m512i x0 = _mm512_xor_si512(load(next), _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                             static_cast<int>(~crc)));
  __m512i x1 = load(next + 64);
  __m512i x2 = load(next + 128);
  __m512i x3 = load(next + 192);
  next += 256;
  length -= 256;
  const __m512i by256 = lanes(fold_constant(256), fold_constant(264));
  for (; length >= 256; length -= 256, next += 256) {
    x0 = fold512(x0, by256, load(next));
    x1 = fold512(x1, by256, load(next + 64));
    x2 = fold512(x2, by256, load(next + 128));
    x3 = fold512(x3, by256, load(next + 192));
  }
  const __m512i by64 = lanes(fold_constant(64), fold_constant(72));
  alignas(64) __m128i x[4];
  _mm512_store_si512(x, fold512(fold512(fold512(x0, by64, x1), by64, x2), by64, x3));
  return finish_folding(x[0], x[1], x[2], x[3], next, length);
}

bool cpu_has_vpclmul512() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("vpclmulqdq");
}

bool cpu_has_pclmul() noexcept {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_PCLMUL) != 0;
}
#endif  // __x86_64__

#endif  // DCP_NATIVE_CRC32C_TARGET

uint32_t crc32c_portable(const void* data, size_t length, uint32_t crc) noexcept {
  const unsigned char* next = static_cast<const unsigned char*>(data);
  const ByteTables& t = kByteTables;
  uint32_t state = ~crc;
  while (length > 0 && (reinterpret_cast<uintptr_t>(next) & 7) != 0) {
    state = (state >> 8) ^ t[0][(state ^ *next++) & 0xFF];
    --length;
  }
  // Slicing-by-8: the state is xored into the next eight bytes, and each byte
  // is pushed through the table for the number of bytes that follow it.
  for (; length >= 8; length -= 8, next += 8) {
    const uint64_t word = load_le64(next) ^ state;
    state = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^
            t[4][(word >> 24) & 0xFF] ^ t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
            t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
  }
  for (; length > 0; --length) {
    state = (state >> 8) ^ t[0][(state ^ *next++) & 0xFF];
  }
  return ~state;
}

struct Implementation {
  Crc32cFunction function;
  const char* name;
};

Implementation detect() noexcept {
#if defined(DCP_NATIVE_CRC32C_TARGET)
  if (cpu_has_crc32c()) {
#if defined(__x86_64__)
    if (cpu_has_pclmul() && cpu_has_vpclmul512()) {
      return {&crc32c_folding512, "sse4.2+avx512-vpclmul"};
    }
    if (cpu_has_pclmul()) {
      return {&crc32c_folding, "sse4.2+pclmul"};
    }
#endif
    return {&crc32c_hardware, kHardwareName};
  }
#endif
  return {&crc32c_portable, "portable"};
}

}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) noexcept {
  // The initial value and final xor are affine terms that cancel: appending
  // b to a shifts a's finished CRC by b's length, and xoring b's CRC adds
  // the rest (zlib's crc32_combine argument, unchanged by the polynomial).
  return multiply_mod(zeros_operator(length_b), crc_a) ^ crc_b;
}

Crc32cFunction crc32c_variant(const char* name) noexcept {
  const std::string wanted = name;
#if defined(DCP_NATIVE_CRC32C_TARGET)
  if (!cpu_has_crc32c()) {
    return nullptr;
  }
  if (wanted == "instruction") {
    return &crc32c_hardware;
  }
#if defined(__x86_64__)
  if (wanted == "fold128" && cpu_has_pclmul()) {
    return &crc32c_folding;
  }
  if (wanted == "fold512" && cpu_has_pclmul() && cpu_has_vpclmul512()) {
    return &crc32c_folding512;
  }
#endif
#endif
  return nullptr;
}

Crc32cFunction crc32c_select(bool portable, const char** name) noexcept {
  static const Implementation best = detect();
  const Implementation chosen = portable ? Implementation{&crc32c_portable, "portable"} : best;
  if (name != nullptr) {
    *name = chosen.name;
  }
  return chosen.function;
}

}  // namespace dcp_native
