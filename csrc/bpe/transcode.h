// UTF-8 from text kept as fixed-width code units, the way CPython stores a str: one byte per character
// (Latin-1), two (UCS-2: the Basic Multilingual Plane) or four (UCS-4).
//
// Why not PyUnicode_AsUTF8AndSize: for a str with any non-ASCII character CPython encodes into a fresh
// heap block one character at a time, and keeps that copy with the str for as long as it lives. On a
// cold pass over mixed-script text that was 15-25% of encode_ordinary's time (C++ side included), on
// Chinese ~10%. Here 16 (Latin-1) or 8 (UCS-2, UCS-4) units go per step, without a branch per unit: ASCII
// as it is, other blocks of the Basic Multilingual Plane as one 32-bit store per unit (UCS-4 blocks with
// an astral character go one unit at a time); the caller reuses one buffer per thread, which stays in
// cache for the encoder that reads it next.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "bpe/unicode.h"

// The 16-byte paths need SSE2 and 64-bit lane moves: x86-64. Elsewhere every unit goes one at a time.
#if defined(__SSE2__) && (defined(__x86_64__) || defined(_M_X64))
#define SPARROW_TRANSCODE_SSE2 1
#include <emmintrin.h>
#endif

namespace sparrow::bpe {

// What the functions below return when the text holds a surrogate code point (U+D800..U+DFFF): UTF-8
// cannot encode it (CPython raises UnicodeEncodeError; the caller lets it do so).
constexpr size_t kHasSurrogate = ~size_t{0};

// Bytes dst must have room for, for n units of the given width: the longest encoding of one unit times n,
// plus slack for the 8- and 16-byte stores.
constexpr size_t utf8_capacity(size_t n, size_t unit_bytes) { return n * (unit_bytes == 1 ? 2 : unit_bytes == 2 ? 3 : 4) + 16; }

namespace transcode_detail {

// Units s[i..end) one at a time; false on a surrogate.
template <class Unit>
inline bool put_units(const Unit* s, size_t i, size_t end, unsigned char*& d) {
  for (; i < end; ++i) {
    const uint32_t c = s[i];
    if (sizeof(Unit) > 1 && (c & 0xFFFFF800u) == 0xD800u) return false;
    d += encode_utf8(c, d);
  }
  return true;
}

#if defined(SPARROW_TRANSCODE_SSE2)
// Per-unit masks of 8 UCS-2 units (0xFFFF lanes): ASCII; 0x800 or more; surrogate.
inline __m128i ascii_units(__m128i v) {
  return _mm_cmpeq_epi16(_mm_and_si128(v, _mm_set1_epi16(static_cast<short>(0xFF80))), _mm_setzero_si128());
}
inline __m128i units_from_800(__m128i v) {
  const __m128i flip = _mm_set1_epi16(static_cast<short>(0x8000));  // unsigned compare via signed
  return _mm_cmpgt_epi16(_mm_xor_si128(v, flip), _mm_set1_epi16(static_cast<short>(0x07FF ^ 0x8000)));
}
inline __m128i surrogate_units(__m128i v) {
  return _mm_cmpeq_epi16(_mm_and_si128(v, _mm_set1_epi16(static_cast<short>(0xF800))),
                         _mm_set1_epi16(static_cast<short>(0xD800)));
}

// Each 32-bit lane u (U+0800..U+FFFF) as its three UTF-8 bytes in the low 24 bits, in memory order.
inline __m128i three_byte_words(__m128i u) {
  const __m128i lead = _mm_srli_epi32(u, 12);
  const __m128i mid = _mm_and_si128(_mm_slli_epi32(u, 2), _mm_set1_epi32(0x3F00));
  const __m128i last = _mm_and_si128(_mm_slli_epi32(u, 16), _mm_set1_epi32(0x3F0000));
  return _mm_or_si128(_mm_or_si128(lead, mid), _mm_or_si128(last, _mm_set1_epi32(0x8080E0)));
}

// 8 units of the Basic Multilingual Plane, no surrogate, of mixed lengths (Chinese text with ASCII
// digits, newlines and Latin words; Cyrillic or Greek with spaces): each unit's bytes as a 32-bit word,
// stored 4 bytes at a time and advanced by its length, with no branch per unit. from80 and from800:
// movemasks of the units >= 0x80 and >= 0x800 (2 bits per unit).
inline void put_bmp(__m128i v, unsigned from80, unsigned from800, unsigned char*& d) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i units[2] = {_mm_unpacklo_epi16(v, zero), _mm_unpackhi_epi16(v, zero)};
  for (int half = 0; half < 2; ++half) {
    const __m128i u = units[half];
    const __m128i two = _mm_or_si128(_mm_or_si128(_mm_srli_epi32(u, 6), _mm_slli_epi32(_mm_and_si128(u, _mm_set1_epi32(0x3F)), 8)),
                                     _mm_set1_epi32(0x80C0));
    const __m128i ge80 = _mm_cmpgt_epi32(u, _mm_set1_epi32(0x7F));
    const __m128i ge800 = _mm_cmpgt_epi32(u, _mm_set1_epi32(0x7FF));
    const __m128i short_form = _mm_or_si128(_mm_and_si128(ge80, two), _mm_andnot_si128(ge80, u));
    const __m128i w = _mm_or_si128(_mm_and_si128(ge800, three_byte_words(u)), _mm_andnot_si128(ge800, short_form));
    const uint64_t pair[2] = {static_cast<uint64_t>(_mm_cvtsi128_si64(w)),
                              static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_unpackhi_epi64(w, w)))};
    for (int k = 0; k < 4; ++k) {
      const uint32_t word = static_cast<uint32_t>(pair[k >> 1] >> (32 * (k & 1)));
      std::memcpy(d, &word, 4);
      const int bit = 2 * (4 * half + k);
      d += 1 + ((from80 >> bit) & 1) + ((from800 >> bit) & 1);
    }
  }
}

// The 3-byte UTF-8 of 4 code points (32-bit lanes, each U+0800..U+FFFF) as 12 bytes at d; writes 14.
// Two lanes at a time are packed into 6 bytes of a 64-bit store.
inline void put_three_byte(__m128i u, unsigned char* d) {
  const __m128i w = three_byte_words(u);
  auto put_pair = [](uint64_t x, unsigned char* at) {
    const uint64_t six = (x & 0xFFFFFFu) | ((x >> 8) & 0xFFFFFF000000ull);
    std::memcpy(at, &six, 8);
  };
  put_pair(static_cast<uint64_t>(_mm_cvtsi128_si64(w)), d);
  put_pair(static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_unpackhi_epi64(w, w))), d + 6);
}
// 8 UCS-2 units (16-bit lanes) that are not all ASCII: their UTF-8 at d (writes up to 16 bytes past the
// last unit's bytes); false on a surrogate. UCS-4 blocks that stay in the Basic Multilingual Plane
// come here too, narrowed to 16 bits.
inline bool put_bmp_block(__m128i v, unsigned char*& d) {
  if (_mm_movemask_epi8(surrogate_units(v))) return false;
  const unsigned from800 = static_cast<unsigned>(_mm_movemask_epi8(units_from_800(v)));
  if (from800 == 0xFFFF) {  // CJK, kana, Hangul, most Indic scripts
    const __m128i zero = _mm_setzero_si128();
    put_three_byte(_mm_unpacklo_epi16(v, zero), d);
    put_three_byte(_mm_unpackhi_epi16(v, zero), d + 12);
    d += 24;
  } else {
    put_bmp(v, ~static_cast<unsigned>(_mm_movemask_epi8(ascii_units(v))) & 0xFFFF, from800, d);
  }
  return true;
}
#endif

}  // namespace transcode_detail

// Latin-1 (every unit < 0x100) to UTF-8; dst has room for utf8_capacity(n, 1) bytes. Returns the length.
inline size_t utf8_from_latin1(const uint8_t* s, size_t n, unsigned char* dst) {
  unsigned char* d = dst;
  size_t i = 0;
#if defined(SPARROW_TRANSCODE_SSE2)
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    if (_mm_movemask_epi8(v) == 0) {  // 16 ASCII bytes are their own UTF-8
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), v);
      d += 16;
    } else {  // each half widened to 16-bit units: one or two bytes each, without a branch per unit
      const __m128i zero = _mm_setzero_si128();
      const __m128i lo = _mm_unpacklo_epi8(v, zero), hi = _mm_unpackhi_epi8(v, zero);
      const unsigned high = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpgt_epi16(lo, _mm_set1_epi16(0x7F)))) |
                            (static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpgt_epi16(hi, _mm_set1_epi16(0x7F)))) << 16);
      transcode_detail::put_bmp(lo, high & 0xFFFF, 0, d);
      transcode_detail::put_bmp(hi, high >> 16, 0, d);
    }
  }
#endif
  transcode_detail::put_units(s, i, n, d);
  return static_cast<size_t>(d - dst);
}

// UCS-2 to UTF-8; dst has room for utf8_capacity(n, 2) bytes. Returns the length, or kHasSurrogate.
inline size_t utf8_from_ucs2(const uint16_t* s, size_t n, unsigned char* dst) {
  unsigned char* d = dst;
  size_t i = 0;
#if defined(SPARROW_TRANSCODE_SSE2)
  using namespace transcode_detail;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    if (_mm_movemask_epi8(ascii_units(v)) == 0xFFFF) {  // 8 ASCII units: their low bytes
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d), _mm_packus_epi16(v, v));
      d += 8;
    } else if (!put_bmp_block(v, d)) {
      return kHasSurrogate;
    }
  }
#endif
  if (!transcode_detail::put_units(s, i, n, d)) return kHasSurrogate;
  return static_cast<size_t>(d - dst);
}

// UCS-4 to UTF-8; dst has room for utf8_capacity(n, 4) bytes. Returns the length, or kHasSurrogate.
// (Units above U+10FFFF do not occur in a Python str.)
inline size_t utf8_from_ucs4(const uint32_t* s, size_t n, unsigned char* dst) {
  unsigned char* d = dst;
  size_t i = 0;
#if defined(SPARROW_TRANSCODE_SSE2)
  const __m128i high = _mm_set1_epi32(static_cast<int>(0xFFFFFF80u));
  const __m128i zero = _mm_setzero_si128();
  for (; i + 8 <= n; i += 8) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 4));
    const __m128i any_high = _mm_or_si128(_mm_and_si128(a, high), _mm_and_si128(b, high));
    if (_mm_movemask_epi8(_mm_cmpeq_epi32(any_high, zero)) == 0xFFFF) {
      const __m128i w = _mm_packs_epi32(a, b);  // 8 ASCII units: 32 -> 16 -> 8 bits, no saturation
      _mm_storel_epi64(reinterpret_cast<__m128i*>(d), _mm_packus_epi16(w, w));
      d += 8;
    } else if (_mm_movemask_epi8(_mm_cmpeq_epi32(_mm_or_si128(_mm_srli_epi32(a, 16), _mm_srli_epi32(b, 16)), zero)) == 0xFFFF) {
      // All 8 in the Basic Multilingual Plane (a str holding one emoji stores all its text this way):
      // narrowed to 16 bits (sign-extended so the signed pack keeps them) and written as UCS-2 is.
      const __m128i v = _mm_packs_epi32(_mm_srai_epi32(_mm_slli_epi32(a, 16), 16), _mm_srai_epi32(_mm_slli_epi32(b, 16), 16));
      if (!transcode_detail::put_bmp_block(v, d)) return kHasSurrogate;
    } else if (!transcode_detail::put_units(s, i, i + 8, d)) {
      return kHasSurrogate;
    }
  }
#endif
  if (!transcode_detail::put_units(s, i, n, d)) return kHasSurrogate;
  return static_cast<size_t>(d - dst);
}

}  // namespace sparrow::bpe
