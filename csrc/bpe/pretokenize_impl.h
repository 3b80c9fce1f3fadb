// The split patterns' piece functions, inline so that the encoder's loop compiles them into itself
// (one call per piece would cost as much as the ASCII work it does). Included by pretokenize.cpp and
// encoder.cpp (and csrc/tests/test_bpe_core.cpp, which checks the 3-byte table) only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "bpe/pretokenize.h"
#include "bpe/unicode.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__GNUC__)
#define SPARROW_INLINE inline __attribute__((always_inline))
#else
#define SPARROW_INLINE inline
#endif

namespace sparrow::bpe::piece {

constexpr uint8_t kLNS = kLetter | kNumber | kSpace;

struct Ch {
  uint32_t cp;
  uint32_t len;
  uint8_t f;
};

// Flags of each byte when it is a whole ASCII character; bytes >= 0x80 get kHigh only, so that a loop
// over ASCII members of a class stops at them and takes the decoding path.
constexpr uint8_t kHigh = 0x80;
struct ByteFlags {
  uint8_t f[256];
  ByteFlags() {
    for (int c = 0; c < 256; ++c) f[c] = c < 128 ? char_flags(static_cast<uint32_t>(c)) : kHigh;
  }
};
inline const ByteFlags kByte;

// Flags of the 3-byte UTF-8 characters (U+0800-FFFF: CJK, kana, Hangul, most Indic scripts, general
// punctuation) by block of 64 code points, the block that the lead byte and the first continuation byte
// name: the flags every code point of the block shares, kMixed where they differ (the two-stage table
// decides) and kNot3 where the two bytes start no valid character (overlong E0 80-9F, surrogates ED A0-BF).
// A run of CJK characters is then classified with one load per character and no decoding branches.
constexpr uint8_t kNot3 = 0xFF;
constexpr uint8_t kMixed = 0xFE;  // no real combination of CharFlags is >= 0x80
struct Block3Flags {
  uint8_t f[1024];
  Block3Flags() {
    for (uint32_t b = 0; b < 1024; ++b) {
      const uint32_t lo = b << 6;
      if (lo < 0x800 || (lo >= 0xD800 && lo <= 0xDFFF)) {
        f[b] = kNot3;
        continue;
      }
      f[b] = char_flags(lo);
      for (uint32_t cp = lo + 1; cp < lo + 64; ++cp) {
        if (char_flags(cp) != f[b]) {
          f[b] = kMixed;
          break;
        }
      }
    }
  }
};
inline const Block3Flags kBlock3;

// The flags of the character at s[i] when it is a well-formed 3-byte UTF-8 sequence, else kNot3 (the
// caller decodes it the general way: ASCII, 2- and 4-byte characters, invalid or truncated bytes).
SPARROW_INLINE uint8_t flags3(const unsigned char* s, size_t n, size_t i) {
  if (i + 2 >= n) return kNot3;
  const uint32_t b0 = s[i], b1 = s[i + 1], b2 = s[i + 2];
  if (((b0 | (b1 << 8) | (b2 << 16)) & 0xC0C0F0u) != 0x8080E0u) return kNot3;
  const uint32_t block = ((b0 & 0x0Fu) << 6) | (b1 & 0x3Fu);
  const uint8_t f = kBlock3.f[block];
  if (f != kMixed) return f;
  return char_flags((block << 6) | (b2 & 0x3Fu));
}

SPARROW_INLINE Ch at(const unsigned char* s, size_t n, size_t i) {
  const unsigned char b = s[i];
  if (b < 0x80) return {b, 1, kByte.f[b]};
  Decoded d = decode_utf8(s, n, i);
  return {d.cp, d.len, char_flags(d.cp)};
}

SPARROW_INLINE bool is_other(uint8_t f) { return (f & kLNS) == 0; }
SPARROW_INLINE bool is_crlf(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// The end of the run of bytes b with ((b | kFold) - kLo) < kSpan (unsigned), from i, 16 bytes at a time:
// ASCII letters (kFold 0x20, 'a', 26), lowercase letters (0, 'a', 26) or digits (0, '0', 10). Bytes >= 0x80
// never match, so the run stops where UTF-8 decoding has to take over. Where SSE2 is missing it returns
// i and the byte loop of the caller does all the work.
template <unsigned char kFold, unsigned char kLo, unsigned char kSpan>
SPARROW_INLINE size_t ascii_run16(const unsigned char* s, size_t n, size_t i) {
#if defined(__SSE2__) && defined(__GNUC__)
  const __m128i fold = _mm_set1_epi8(static_cast<char>(kFold));
  const __m128i bias = _mm_set1_epi8(static_cast<char>(kLo + 0x80));  // x - lo, then as signed
  const __m128i limit = _mm_set1_epi8(static_cast<char>(kSpan - 0x80));
  while (i + 16 <= n) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i x = _mm_sub_epi8(_mm_or_si128(v, fold), bias);
    const unsigned out = ~static_cast<unsigned>(_mm_movemask_epi8(_mm_cmplt_epi8(x, limit))) & 0xFFFFu;
    if (out) return i + static_cast<size_t>(__builtin_ctz(out));
    i += 16;
  }
#else
  (void)s;
  (void)n;
#endif
  return i;
}

// End of the run of characters with any of `mask` set, starting at i. ASCII members are consumed by a
// table loop (for letters, lowercase letters and digits first 16 bytes at a time); a non-ASCII byte is
// decoded and classified.
SPARROW_INLINE size_t run_any(const unsigned char* s, size_t n, size_t i, uint8_t mask) {
  if (mask == kLetter) i = ascii_run16<0x20, 'a', 26>(s, n, i);
  else if (mask == kLowerish) i = ascii_run16<0, 'a', 26>(s, n, i);
  else if (mask == kNumber) i = ascii_run16<0, '0', 10>(s, n, i);
  for (;;) {
    while (i < n && (kByte.f[s[i]] & mask)) ++i;
    if (i >= n || s[i] < 0x80) return i;
    if (uint8_t f3 = flags3(s, n, i); f3 != kNot3) {  // a run of 3-byte characters (CJK)
      do {
        if (!(f3 & mask)) return i;
        i += 3;
      } while ((f3 = flags3(s, n, i)) != kNot3);
      continue;
    }
    Decoded d = decode_utf8(s, n, i);
    if (!(char_flags(d.cp) & mask)) return i;
    i += d.len;
  }
}

// End of the run of "other" characters (not letter, number or whitespace) starting at i.
SPARROW_INLINE size_t run_other(const unsigned char* s, size_t n, size_t i) {
  for (;;) {
    while (i < n && (kByte.f[s[i]] & (kLNS | kHigh)) == 0) ++i;
    if (i >= n || s[i] < 0x80) return i;
    if (uint8_t f3 = flags3(s, n, i); f3 != kNot3) {
      do {
        if (!is_other(f3)) return i;
        i += 3;
      } while ((f3 = flags3(s, n, i)) != kNot3);
      continue;
    }
    Decoded d = decode_utf8(s, n, i);
    if (!is_other(char_flags(d.cp))) return i;
    i += d.len;
  }
}

// Whitespace run starting at i: its end, the start of its last character, and the end of its last
// \r or \n (0 when it has none; a run never ends at 0 since i < end).
struct SpaceRun {
  size_t end;
  size_t last_start;
  size_t newline_end;
};

SPARROW_INLINE SpaceRun space_run(const unsigned char* s, size_t n, size_t i) {
  SpaceRun r{i, i, 0};
  while (r.end < n) {
    if (s[r.end] == ' ') {  // runs of spaces (indentation) 16 bytes at a time
      size_t e = ascii_run16<0, ' ', 1>(s, n, r.end + 1);
      while (e < n && s[e] == ' ') ++e;
      r.last_start = e - 1;
      r.end = e;
      continue;
    }
    Ch c = at(s, n, r.end);
    if (!(c.f & kSpace)) break;
    r.last_start = r.end;
    r.end += c.len;
    if (is_crlf(c.cp)) r.newline_end = r.end;
  }
  return r;
}

// `\s+(?!\S)|\s` (equivalently `\s+(?!\S)|\s+`) at a whitespace run: the whole run at the end of the
// text, else the run minus its last character (which may then prefix the next word), else one char.
SPARROW_INLINE size_t space_tail(const SpaceRun& r, size_t n, size_t i, uint32_t first_len) {
  if (r.end == n) return n;
  if (r.last_start > i) return r.last_start;
  return i + first_len;
}

SPARROW_INLINE uint32_t ascii_lower(uint32_t cp) { return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp; }

// Contractions after an apostrophe at s[i]. Case-insensitive variants fold like the regex engines do:
// (?i)s also matches U+017F LATIN SMALL LETTER LONG S.
SPARROW_INLINE size_t contraction(const unsigned char* s, size_t n, size_t i, bool fold_case) {
  if (i + 1 >= n || s[i] != '\'') return 0;
  Ch c = at(s, n, i + 1);
  uint32_t a = fold_case ? ascii_lower(c.cp) : c.cp;
  if (fold_case && a == 0x17F) a = 's';
  if (a == 's' || a == 'd' || a == 'm' || a == 't') return i + 1 + c.len;
  if (i + 2 >= n) return 0;
  uint32_t b = s[i + 2];
  if (fold_case) b = ascii_lower(b);
  if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i + 3;
  return 0;
}

SPARROW_INLINE size_t gpt2_piece(const unsigned char* s, size_t n, size_t i) {
  Ch c = at(s, n, i);
  if (c.cp == '\'') {
    if (size_t e = contraction(s, n, i, false)) return e;
  }
  size_t j = i;
  Ch d = c;
  if (c.cp == ' ' && i + 1 < n) {
    j = i + 1;
    d = at(s, n, j);
  }
  if (d.f & kLetter) return run_any(s, n, j + d.len, kLetter);
  if (d.f & kNumber) return run_any(s, n, j + d.len, kNumber);
  if (is_other(d.f)) return run_other(s, n, j + d.len);
  // c is whitespace here: either not a space, or a space followed by whitespace / the end.
  SpaceRun r = space_run(s, n, i);
  return space_tail(r, n, i, c.len);
}

// cl100k and the patterns that Llama-3 and Qwen2 ship in tokenizer.json, which differ from it in two
// places only: no `\s++$` alternative (kTrailingRun false) and, for Qwen2, `\p{N}` instead of
// `\p{N}{1,3}` (kMaxDigits 1). Their non-possessive forms match the same text as cl100k's possessive
// ones (no alternative after them can succeed where the possessive one failed).
constexpr size_t kFail = static_cast<size_t>(-1);

// \p{N}{1,kMaxDigits}, the first number character (c) at i.
template <int kMaxDigits>
SPARROW_INLINE size_t number_run(const unsigned char* s, size_t n, size_t i, Ch c) {
  size_t e = i + c.len;
  for (int k = 1; k < kMaxDigits && e < n; ++k) {
    Ch d = at(s, n, e);
    if (!(d.f & kNumber)) break;
    e += d.len;
  }
  return e;
}

// " ?[^\s\p{L}\p{N}]++[\r\n]*" (o200k: "[\r\n/]*") from i, whose character is c; kFail when it does not match.
template <bool kAlsoSlash>
SPARROW_INLINE size_t other_run(const unsigned char* s, size_t n, size_t i, Ch c) {
  size_t j = i;
  Ch d = c;
  if (c.cp == ' ' && i + 1 < n) {
    j = i + 1;
    d = at(s, n, j);
  }
  if (!is_other(d.f)) return kFail;
  size_t e = run_other(s, n, j + d.len);
  while (e < n && (s[e] == '\r' || s[e] == '\n' || (kAlsoSlash && s[e] == '/'))) ++e;
  return e;
}

template <bool kTrailingRun, int kMaxDigits>
SPARROW_INLINE size_t cl100k_like_piece(const unsigned char* s, size_t n, size_t i) {
  Ch c = at(s, n, i);
  if (c.cp == '\'') {
    if (size_t e = contraction(s, n, i, true)) return e;
  }
  if (c.f & kLetter) return run_any(s, n, i + c.len, kLetter);
  // [^\r\n\p{L}\p{N}]?+\p{L}++ with the optional char present.
  if (!(c.f & kNumber) && !is_crlf(c.cp) && i + c.len < n) {
    Ch d = at(s, n, i + c.len);
    if (d.f & kLetter) return run_any(s, n, i + c.len + d.len, kLetter);
  }
  if (c.f & kNumber) return number_run<kMaxDigits>(s, n, i, c);
  if (size_t e = other_run<false>(s, n, i, c); e != kFail) return e;
  SpaceRun r = space_run(s, n, i);
  if (kTrailingRun && r.end == n) return n;  // \s++$
  if (r.newline_end) return r.newline_end;  // \s*[\r\n]
  return space_tail(r, n, i, c.len);    // \s+(?!\S)|\s
}


// o200k's two word alternatives after the optional prefix character, starting at st:
//   first:  [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+  (upper* lower+)
//   second: [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*  (upper+ lower*)
// each followed by an optional case-insensitive contraction. The classes overlap (Lm, Lo, M are in
// both), so the first alternative backtracks the greedy upper* run to the last character that can
// start lower+.
inline size_t o200k_word(const unsigned char* s, size_t n, size_t st, bool first) {
  if (st >= n) return kFail;
  size_t u = st;
  size_t last_lower_end = 0;
  for (;;) {
    while (u < n && (kByte.f[s[u]] & kUpperish)) ++u;  // ASCII capitals (never in the lower class)
    if (u >= n || s[u] < 0x80) break;
    if (uint8_t f3 = flags3(s, n, u); f3 != kNot3) {  // a run of 3-byte characters (CJK: Lo, both classes)
      do {
        if (!(f3 & kUpperish)) break;
        u += 3;
        if (f3 & kLowerish) last_lower_end = u;
      } while ((f3 = flags3(s, n, u)) != kNot3);
      if (f3 != kNot3) break;
      continue;
    }
    Ch c = at(s, n, u);
    if (!(c.f & kUpperish)) break;
    u += c.len;
    if (c.f & kLowerish) last_lower_end = u;
  }
  size_t e;
  if (first) {
    if (u < n && (at(s, n, u).f & kLowerish)) {
      e = run_any(s, n, u, kLowerish);
    } else if (last_lower_end) {
      e = last_lower_end;
    } else {
      return kFail;
    }
  } else {
    if (u == st) return kFail;
    e = run_any(s, n, u, kLowerish);
  }
  if (e < n && s[e] == '\'') {
    if (size_t c = contraction(s, n, e, true)) {
      // o200k's suffix list is 's|'t|'re|'ve|'m|'ll|'d: the same set as the contraction alternatives.
      e = c;
    }
  }
  return e;
}

// o200k's word alternatives at an ASCII letter s[st] when the characters that decide them are ASCII:
// capitals then lowercase letters (either run may be empty, not both), then a contraction. ASCII
// capitals are upper-class only and ASCII lowercase letters lower-class only, so no backtracking can
// apply: the first alternative takes the capitals and a lowercase run when one follows, else the
// second takes the capitals. kFail when the capitals stop at a byte >= 0x80 (a non-ASCII letter or
// mark could continue either class; o200k_word decides). The lowercase run itself may continue into
// non-ASCII lower-class characters (run_any decodes them).
SPARROW_INLINE size_t o200k_ascii_word(const unsigned char* s, size_t n, size_t st) {
  size_t u = st;
  while (u < n && (kByte.f[s[u]] & kUpperish)) ++u;
  if (u < n && s[u] >= 0x80) return kFail;
  size_t e = (u < n && (kByte.f[s[u]] & kLowerish)) ? run_any(s, n, u, kLowerish) : u;
  if (e < n && s[e] == '\'') {
    if (size_t c = contraction(s, n, e, true)) e = c;
  }
  return e;
}

SPARROW_INLINE size_t o200k_piece(const unsigned char* s, size_t n, size_t i) {
  // ASCII fast path: a piece that starts with an ASCII character whose word alternatives are decided
  // by ASCII characters (most of English prose and code) skips the general word matcher's four tries.
  if (const unsigned char b = s[i]; b < 0x80) {
    const uint8_t f = kByte.f[b];
    if (f & kLetter) {
      if (size_t e = o200k_ascii_word(s, n, i); e != kFail) return e;
    } else if (!(f & kNumber) && b != '\r' && b != '\n') {
      // b may prefix a word: [^\r\n\p{L}\p{N}]? before either alternative.
      if (i + 1 >= n || s[i + 1] < 0x80) {
        const uint8_t g = i + 1 < n ? kByte.f[s[i + 1]] : 0;
        if (g & kLetter) {
          if (size_t e = o200k_ascii_word(s, n, i + 1); e != kFail) return e;
        } else {
          // Neither b nor the next character is in a word class: no word alternative matches here.
          const Ch c{b, 1, f};
          if (size_t e = other_run<true>(s, n, i, c); e != kFail) return e;
          SpaceRun r = space_run(s, n, i);
          if (r.newline_end) return r.newline_end;
          return space_tail(r, n, i, 1);
        }
      }
    } else if (f & kNumber) {
      return number_run<3>(s, n, i, Ch{b, 1, f});
    }
  }
  Ch c = at(s, n, i);
  const bool prefix = !(c.f & (kLetter | kNumber)) && !is_crlf(c.cp);
  // Either word alternative needs a character of a case class at i or, after a prefix, at the next
  // character; where neither is (CJK punctuation before a newline, a digit or ASCII punctuation), the
  // four tries are skipped.
  constexpr uint8_t kWord = kUpperish | kLowerish;
  const bool word = (c.f & kWord) || (prefix && i + c.len < n && (at(s, n, i + c.len).f & kWord));
  for (bool first : {true, false}) {
    if (!word) break;
    if (prefix) {
      size_t e = o200k_word(s, n, i + c.len, first);
      if (e != kFail) return e;
    }
    size_t e = o200k_word(s, n, i, first);
    if (e != kFail) return e;
  }
  if (c.f & kNumber) return number_run<3>(s, n, i, c);
  if (size_t e = other_run<true>(s, n, i, c); e != kFail) return e;
  SpaceRun r = space_run(s, n, i);
  if (r.newline_end) return r.newline_end;  // \s*[\r\n]+
  return space_tail(r, n, i, c.len);        // \s+(?!\S)|\s+
}


// DeepSeek-V3: three Isolated Splits in sequence, each applied to the pieces of the one before:
//   1. \p{N}{1,3}
//   2. [\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+   (CJK ideographs, kana)
//   3. [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// So the text falls into digit groups (never split further: no alternative of 3 matches a digit), runs
// of the CJK ranges and the gaps between, and split 3 runs inside each run or gap as if it were the
// whole text (its end is the segment's end). Where no alternative of split 3 matches, the characters
// up to the next match are a piece of their own, as Isolated keeps unmatched text.
SPARROW_INLINE bool deepseek_cjk(uint32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FA5) || (cp >= 0x3040 && cp <= 0x30FF);
}

// Split 3 at i inside a segment: a character ends the segment when barrier(c) (for a CJK run: a
// character outside the ranges; for a gap: a number or a CJK-range character).
template <bool kInCjk>
SPARROW_INLINE size_t deepseek_split3(const unsigned char* s, size_t n, size_t i, Ch c) {
  auto barrier = [](const Ch& x) { return kInCjk ? !deepseek_cjk(x.cp) : ((x.f & kNumber) || deepseek_cjk(x.cp)); };
  // The end of the run of characters with any of `mask` from j, stopping at the segment's end.
  auto run = [&](size_t j, uint8_t mask) {
    while (j < n) {
      Ch d = at(s, n, j);
      if (!(d.f & mask) || barrier(d)) break;
      j += d.len;
    }
    return j;
  };
  auto next_in_segment = [&](size_t j, Ch& d) {
    if (j >= n) return false;
    d = at(s, n, j);
    return !barrier(d);
  };
  auto crlf_run = [&](size_t j) {
    if (kInCjk) return j;  // \r and \n are outside the CJK ranges: a run's segment ends before them
    while (j < n && (s[j] == '\r' || s[j] == '\n')) ++j;
    return j;
  };
  constexpr uint8_t kLM = kLetter | kMark;
  Ch d{};
  // [ASCII punctuation][A-Za-z]+
  if (c.cp < 0x80 && (c.f & kPunctSym) && i + 1 < n && ((s[i + 1] | 0x20) >= 'a' && (s[i + 1] | 0x20) <= 'z')) {
    size_t e = i + 2;
    while (e < n && ((s[e] | 0x20) >= 'a' && (s[e] | 0x20) <= 'z')) ++e;
    return e;
  }
  // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
  const bool prefix = !(c.f & (kLetter | kPunctSym)) && !is_crlf(c.cp);
  if (prefix && next_in_segment(i + c.len, d) && (d.f & kLM)) return run(i + c.len + d.len, kLM);
  if (c.f & kLM) return run(i + c.len, kLM);
  //  ?[\p{P}\p{S}]+[\r\n]*
  if (c.cp == ' ' && next_in_segment(i + 1, d) && (d.f & kPunctSym)) return crlf_run(run(i + 1 + d.len, kPunctSym));
  if (c.f & kPunctSym) return crlf_run(run(i + c.len, kPunctSym));
  if (c.f & kSpace) {
    SpaceRun r = space_run(s, n, i);  // whitespace is never a barrier
    if (r.newline_end) return r.newline_end;  // \s*[\r\n]+
    Ch e{};
    const bool at_end = !next_in_segment(r.end, e);
    if (at_end) return r.end;                  // \s+(?!\S) at the segment's end
    if (r.last_start > i) return r.last_start;  // \s+(?!\S)
    return i + c.len;                           // \s+
  }
  // No alternative matches at i: the piece runs to the next position where one does.
  size_t j = i + c.len;
  while (next_in_segment(j, d)) {
    if (d.f & (kLM | kPunctSym | kSpace)) break;
    Ch after{};
    if (!is_crlf(d.cp) && next_in_segment(j + d.len, after) && (after.f & kLM)) break;
    j += d.len;
  }
  return j;
}

SPARROW_INLINE size_t deepseek_v3_piece(const unsigned char* s, size_t n, size_t i) {
  Ch c = at(s, n, i);
  if (c.f & kNumber) return number_run<3>(s, n, i, c);  // split 1
  if (deepseek_cjk(c.cp)) return deepseek_split3<true>(s, n, i, c);
  return deepseek_split3<false>(s, n, i, c);
}

SPARROW_INLINE size_t next(Pattern p, const unsigned char* s, size_t n, size_t i) {
  switch (p) {
    case Pattern::kGpt2: return gpt2_piece(s, n, i);
    case Pattern::kCl100k: return cl100k_like_piece<true, 3>(s, n, i);
    case Pattern::kLlama3: return cl100k_like_piece<false, 3>(s, n, i);
    case Pattern::kQwen2: return cl100k_like_piece<false, 1>(s, n, i);
    case Pattern::kDeepSeekV3: return deepseek_v3_piece(s, n, i);
    case Pattern::kO200k: return o200k_piece(s, n, i);
  }
  return n;
}


// ---- Bulk piece starts on ASCII text: the cl100k family (cl100k, Llama-3, Qwen2), o200k, GPT-2, DeepSeek-V3 ----
//
// On ASCII the regexes' choices depend on a few neighbouring characters only, so the starts of every
// piece in a 64-byte window can be computed from bit masks of the bytes' classes, without a branch per
// piece (the scalar functions above take one or two hard-to-predict branches per piece, the larger part
// of their cost on prose and code). Classes: L letter, N digit, S space, T \t \v \f, R \r \n (S|T|R is
// \s on ASCII), O everything else (punctuation, symbols, controls; ' and / among them). With the
// window's first byte i a piece start (so nothing before it matters: no pattern looks behind), a
// position p starts a piece in the cl100k family when:
//   - an L run starts at p, unless p-1 is its prefix ([^\r\n\p{L}\p{N}]?+ before \p{L}++);
//   - p is the prefix of the L run starting at p+1: S or T (the last character of a whitespace run), or
//     an O run of length one not preceded by S (a space takes it into " ?[^\s\p{L}\p{N}]++" instead);
//   - an N run starts at p, or p is 3 (Qwen2: 1) digits after a start within it;
//   - an O run starts at p and p-1 is not S (else that space starts the piece);
//   - a whitespace run starts at p, unless p is an R run right after an O run ([\r\n]*+ took it); the
//     first position after such an absorbed R run;
//   - p is the last character of a whitespace run and not R (\s+(?!\S) leaves it to the next piece);
//   - p follows the last R of a whitespace run (\s*[\r\n] ended there), when not R itself;
//   - p follows a contraction ('s 'd 'm 't 'll 've 're, any case) at an O run "'" that starts a piece.
// o200k differs in three places: an upper-case letter after a lower-case one starts a piece (its words
// are [A-Z]*[a-z]+ or [A-Z]+[a-z]* on ASCII); a contraction is the suffix of the word before it rather
// than a piece of its own (no piece starts at its "'" or inside it, one starts after it); and what
// follows a punctuation run is [\r\n/]*, so a "/" after its \r \n is absorbed too and the piece after
// it may start inside an O run (where its first character can prefix a word). GPT-2 is simpler: a run
// of letters, digits or punctuation starts a piece unless a space before it does (" ?X++"), whitespace
// runs start at their first and last characters, and contractions are lower case only.
// A verdict at p reads bytes up to p+2 (a contraction's letters) and may set the start at p+3 (after
// them), except inside a whitespace run (its end and its last R), so the window's verdicts are final
// below `limit`: 3 bytes before the first byte not seen (the window's end, the text's end, or a byte >= 0x80 where the Unicode classes take over) and
// before the inside of a whitespace run that reaches it. tests/test_tokenizer_encoder.py compares the
// result with the regexes on long random texts of these classes (hypothesis) and on real text.
struct AsciiClasses {
  uint64_t letter, lower, digit, space, tab, crlf, quote, slash, high;
  uint64_t ctrl;  // bytes below 0x20 and 0x7F, \s among them (only with kCtrl)
};

template <bool kCtrl = false>
SPARROW_INLINE AsciiClasses classify64(const unsigned char* p) {
  AsciiClasses c{};
#if defined(__SSE2__) && defined(__GNUC__)
  const __m128i fold = _mm_set1_epi8(0x20);
  const __m128i a_bias = _mm_set1_epi8(static_cast<char>('a' + 0x80));
  const __m128i n_bias = _mm_set1_epi8(static_cast<char>('0' + 0x80));
  const __m128i t_bias = _mm_set1_epi8(static_cast<char>('\t' + 0x80));
  const __m128i lim26 = _mm_set1_epi8(static_cast<char>(26 - 0x80));
  const __m128i lim10 = _mm_set1_epi8(static_cast<char>(10 - 0x80));
  const __m128i lim5 = _mm_set1_epi8(static_cast<char>(5 - 0x80));
  for (int k = 0; k < 4; ++k) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
    const auto bits = [&](__m128i m) { return static_cast<uint64_t>(static_cast<unsigned>(_mm_movemask_epi8(m))) << (16 * k); };
    const __m128i cr = _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('\r')), _mm_cmpeq_epi8(v, _mm_set1_epi8('\n')));
    c.letter |= bits(_mm_cmplt_epi8(_mm_sub_epi8(_mm_or_si128(v, fold), a_bias), lim26));
    c.digit |= bits(_mm_cmplt_epi8(_mm_sub_epi8(v, n_bias), lim10));
    c.space |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')));
    c.tab |= bits(_mm_andnot_si128(cr, _mm_cmplt_epi8(_mm_sub_epi8(v, t_bias), lim5)));  // 09-0D less \r \n
    c.crlf |= bits(cr);
    c.quote |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8('\'')));
    c.slash |= bits(_mm_cmpeq_epi8(v, _mm_set1_epi8('/')));
    c.lower |= bits(_mm_cmplt_epi8(_mm_sub_epi8(v, a_bias), lim26));
    c.high |= bits(v);
    if constexpr (kCtrl)  // signed: bytes >= 0x80 are below 0x20 too; they end the window anyway
      c.ctrl |= bits(_mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20)), _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7F))));
  }
#else
  // Without SSE2, the same classes from the Unicode tables' flags of ASCII bytes (kHigh for the rest).
  for (int j = 0; j < 64; ++j) {
    const unsigned char b = p[j];
    const uint8_t f = kByte.f[b];
    const uint64_t bit = uint64_t{1} << j;
    if (f & kHigh) c.high |= bit;
    else if (f & kLetter) c.letter |= bit, c.lower |= (f & kLowerish) ? bit : 0;
    else if (f & kNumber) c.digit |= bit;
    else if (f & kSpace) (b == ' ' ? c.space : is_crlf(b) ? c.crlf : c.tab) |= bit;
    else if (b == '\'') c.quote |= bit;
    else if (b == '/') c.slash |= bit;
    if (kCtrl && (b < 0x20 || b == 0x7F)) c.ctrl |= bit;
  }
#endif
  return c;
}

SPARROW_INLINE unsigned ctz64(uint64_t x) { return static_cast<unsigned>(__builtin_ctzll(x)); }

enum class Bulk { kCl100k, kQwen2, kO200k, kGpt2, kDeepSeekV3 };

// The piece starts in s[i..i+64) as bits (bit j: i+j), i a piece start, all final; bit 0 is left out.
// 0 when no start after i is final (a long run, a byte >= 0x80 close by): the caller takes the scalar way.
template <Bulk kFamily>
SPARROW_INLINE uint64_t bulk_starts(const unsigned char* s, size_t n, size_t i) {
  constexpr bool kCtrl = kFamily == Bulk::kDeepSeekV3;
  AsciiClasses c;
  unsigned known = 64;  // bytes of the window that are text
  if (i + 64 <= n) {
    c = classify64<kCtrl>(s + i);
  } else {
    unsigned char buf[64] = {};
    known = static_cast<unsigned>(n - i);
    std::memcpy(buf, s + i, known);
    c = classify64<kCtrl>(buf);
  }
  if (c.high) known = std::min(known, ctz64(c.high));
  if (known < 4) return 0;
  const uint64_t seen = known == 64 ? ~uint64_t{0} : (uint64_t{1} << known) - 1;
  const uint64_t L = c.letter & seen, N = c.digit & seen, S = c.space & seen, R = c.crlf & seen;
  const uint64_t U = S | (c.tab & seen);  // whitespace other than \r \n
  const uint64_t W = U | R;
  const uint64_t O = seen & ~(L | N | W);
  const uint64_t l_start = L & ~(L << 1), w_start = W & ~(W << 1), w_last = W & ~(W >> 1);
  uint64_t o_start = O & ~(O << 1);
  const uint64_t after_space = S << 1;
  uint64_t starts;
  unsigned limit = known - 3;  // so that p + 3 (a contraction's end) stays a bit of the window
  // The letters of the contraction at the "'" at p (0: none), as the scalar patterns match it.
  auto contraction_letters = [&](unsigned p, bool fold_case) -> unsigned {
    const size_t e = contraction(s, n, i + p, fold_case);
    return e ? static_cast<unsigned>(e - (i + p) - 1) : 0;
  };

  // Digits in groups of 3 (Qwen2: 1) from the start of their run.
  auto digit_groups = [&] {
    uint64_t group = N & ~(N << 1);
    if constexpr (kFamily == Bulk::kQwen2) {
      group = N;
    } else {
      for (uint64_t g = group; g;) {
        g = (g << 3) & N & (N << 1) & (N << 2);
        group |= g;
      }
    }
    return group;
  };
  // After the last \r \n of a whitespace run: a run of U after an R is the run's tail when what follows
  // it is not R (rare enough per window for a loop). `skip`: R runs absorbed by the punctuation before.
  auto tails_after_newlines = [&](uint64_t skip) {
    for (uint64_t cand = U & ~(U << 1) & (R << 1) & ~skip; cand; cand &= cand - 1) {
      const unsigned p = ctz64(cand);
      const unsigned e = p + ctz64(~(U >> p));  // the end of the U run (64 when it reaches the window's end)
      if (e >= known) {
        limit = std::min(limit, p);
        break;
      }
      if (!((R >> e) & 1)) starts |= uint64_t{1} << p;
    }
  };

  // A run of \r \n (o200k: of [\r\n/]) right after a punctuation run belongs to it: `first` marks each
  // such run's first byte, and adding it to the run carries through the run to the position after it.
  struct Absorbed {
    uint64_t inside, after;
  };
  auto absorb = [&](uint64_t absorbable, uint64_t first) {
    const uint64_t carried = absorbable + first;
    return Absorbed{absorbable & ~carried, carried & ~absorbable & seen};
  };
  // Whitespace pieces: each run starts one unless punctuation absorbed it, so does the position after
  // what was absorbed, and `last` (run ends that start a piece of their own); nothing starts inside
  // what was absorbed.
  auto add_whitespace = [&](const Absorbed& a, uint64_t last) {
    starts |= (w_start & ~a.inside) | a.after | last;
    starts &= ~a.inside;
    tails_after_newlines(a.after);
  };

  if constexpr (kFamily == Bulk::kDeepSeekV3) {
    // Split 1 makes each group of 3 digits a segment and split 3 runs in the gaps between, as if each
    // were the whole text; on ASCII it differs from the cl100k family in four places. A control
    // character (C: below 0x20 or 0x7F, not \s) is neither punctuation nor \s: only the word
    // alternative takes it, as the prefix of a letter run (even after a space); elsewhere it is
    // unmatched text, a piece up to the next match. A single punctuation character that starts a piece
    // takes the letters after it ([P][A-Za-z]+). There are no contractions. A whitespace run right before
    // a digit ends its gap, so \s+(?!\S) takes all of it.
    const uint64_t C = c.ctrl & seen & ~W;
    const uint64_t P = O & ~C;
    const uint64_t p_start = P & ~(P << 1);
    const uint64_t prefix = (l_start >> 1) & (U | C | (p_start & ~after_space));
    starts = prefix | (l_start & ~(prefix << 1)) | digit_groups() | (p_start & ~after_space) | (C & ~(C << 1));
    add_whitespace(absorb(R, R & (P << 1)), w_last & U & ~(N >> 1));
  } else if constexpr (kFamily == Bulk::kGpt2) {
    starts = ((l_start | (N & ~(N << 1)) | o_start) & ~after_space) | w_start | w_last;
    // Contractions (lower case) at a "'" that starts a piece before a letter: the letter run then starts
    // after them, not right after the "'".
    for (uint64_t q = c.quote & o_start & ~after_space & (l_start >> 1) & ((uint64_t{1} << limit) - 1); q; q &= q - 1) {
      const unsigned p = ctz64(q);
      if (const unsigned k = contraction_letters(p, false)) starts = (starts & ~(uint64_t{2} << p)) | (uint64_t{1} << (p + 1 + k));
    }
  } else {
    // The \r \n right after a punctuation run belong to it (o200k: and any "/" among them), and the
    // piece after them starts at the next position (adding the run's start carries through the run to it).
    const uint64_t absorbable = kFamily == Bulk::kO200k ? R | (c.slash & seen) : R;
    uint64_t absorbed_start = R & (O << 1);
    if constexpr (kFamily == Bulk::kO200k) {
      // Only the first such R of a run of [\r\n/] starts what is absorbed: an R after a "/" that the run
      // already absorbed is not after a punctuation run ("'\n/\n/" is one piece). The first one: at the
      // run's start, or where the carry from the run's start through what precedes it lands.
      const uint64_t run_start = absorbable & ~(absorbable << 1), rest = absorbable & ~absorbed_start;
      absorbed_start &= run_start | (rest + (run_start & rest));
    }
    const Absorbed absorbed = absorb(absorbable, absorbed_start);
    o_start = (o_start & ~absorbed.inside) | (absorbed.after & O);
    // Letters, and the prefix character a word takes.
    const uint64_t prefix = (l_start >> 1) & (U | (o_start & ~after_space));
    starts = prefix | (l_start & ~(prefix << 1));
    if constexpr (kFamily == Bulk::kO200k) starts |= L & ~c.lower & (c.lower << 1);  // aB: a | B
    starts |= digit_groups();
    // Punctuation runs, unless a space before them starts the piece.
    starts |= o_start & ~after_space;
    add_whitespace(absorbed, w_last & U);
    if constexpr (kFamily == Bulk::kO200k) {
      // A contraction right after a word is its suffix: no piece starts at the "'" or inside it. (Not
      // right after another suffix: "it's's" is "it's" then the word "'s".)
      unsigned after_suffix = 64;
      for (uint64_t q = c.quote & (L << 1) & (L >> 1) & ((uint64_t{1} << limit) - 1); q; q &= q - 1) {
        const unsigned p = ctz64(q);
        if (p == after_suffix) continue;
        if (const unsigned k = contraction_letters(p, true)) {
          starts = (starts & ~(((uint64_t{2} << k) - 1) << p)) | (uint64_t{1} << (p + 1 + k));
          after_suffix = p + 1 + k;
        }
      }
    } else {
      // Contractions at a "'" that starts a piece before a letter (the word alternative would take it
      // as a prefix otherwise: same start, but the piece ends after the contraction).
      for (uint64_t q = c.quote & o_start & ~after_space & (l_start >> 1) & ((uint64_t{1} << limit) - 1); q; q &= q - 1) {
        const unsigned p = ctz64(q);
        if (const unsigned k = contraction_letters(p, true)) starts |= uint64_t{1} << (p + 1 + k);
      }
    }
  }
  // A whitespace run that reaches the last byte seen: its inside waits for the next window.
  if ((W >> (known - 1)) & 1) limit = std::min(limit, 64 - static_cast<unsigned>(__builtin_clzll(w_start)));
  return starts & ((uint64_t{1} << limit) - 1) & ~uint64_t{1};
}

}  // namespace sparrow::bpe::piece

namespace sparrow::bpe {

// Splits s[0..n) piece by piece: next(i) is the end of the piece starting at i, the end that the call
// before returned (0 first). Every pattern takes its pieces 64 bytes at a time where
// the text is ASCII (bulk_starts), the rest one piece at a time.
template <Pattern P>
struct Splitter {
  const unsigned char* s;
  size_t n;
  size_t base = 0;       // the window that `pending` counts from
  uint64_t pending = 0;  // the window's piece starts not returned yet

  Splitter(const unsigned char* text, size_t size) : s(text), n(size) {}

  SPARROW_INLINE size_t next(size_t i) {
    if (pending) {
      const size_t e = base + piece::ctz64(pending);
      pending &= pending - 1;
      return e;
    }
    // A byte >= 0x80 among the next 8 leaves the window too little to decide (Chinese text meets one
    // at nearly every ASCII piece): the scalar way, without classifying 64 bytes for nothing.
    uint64_t head;
    if (i + 8 <= n) std::memcpy(&head, s + i, 8);
    else head = s[i];
    if (!(head & 0x8080808080808080ull)) {
      constexpr piece::Bulk kFamily = P == Pattern::kQwen2  ? piece::Bulk::kQwen2
                                      : P == Pattern::kO200k ? piece::Bulk::kO200k
                                      : P == Pattern::kGpt2  ? piece::Bulk::kGpt2
                                      : P == Pattern::kDeepSeekV3 ? piece::Bulk::kDeepSeekV3
                                                             : piece::Bulk::kCl100k;
      if (const uint64_t m = piece::bulk_starts<kFamily>(s, n, i)) {
        base = i;
        pending = m & (m - 1);
        return i + piece::ctz64(m);
      }
    }
    return piece::next(P, s, n, i);
  }
};

}  // namespace sparrow::bpe

