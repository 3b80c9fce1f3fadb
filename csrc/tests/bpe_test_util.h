// Minimal assertion helpers for the plain-C++ BPE tests (no test framework download).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bpe/encoder.h"

namespace bpe_test {

// Plain UTF-8 of one code point, one byte at a time: the reference the fuzz and transcode tests compare with.
inline void put_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

inline int& failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++bpe_test::failures();                                                    \
    }                                                                            \
  } while (0)

#define CHECK_THROWS(expr, type)                                                          \
  do {                                                                                    \
    bool thrown_ = false;                                                                 \
    try {                                                                                 \
      (void)(expr);                                                                       \
    } catch (const type&) {                                                               \
      thrown_ = true;                                                                     \
    } catch (...) {                                                                       \
    }                                                                                     \
    if (!thrown_) {                                                                       \
      std::fprintf(stderr, "%s:%d: expected %s from %s\n", __FILE__, __LINE__, #type, #expr); \
      ++bpe_test::failures();                                                             \
    }                                                                                     \
  } while (0)

inline int finish(const char* name) {
  if (failures()) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}

// A small byte-level vocabulary: the 256 bytes, then tokens built by `merges` (pairs of byte strings,
// in priority order). Gives the ids for Encoder::from_vocab_and_merges.
struct TinyVocab {
  std::vector<std::string> vocab;
  std::vector<std::pair<uint32_t, uint32_t>> merges;

  explicit TinyVocab(const std::vector<std::pair<std::string, std::string>>& pairs) {
    for (int b = 0; b < 256; ++b) vocab.push_back(std::string(1, static_cast<char>(b)));
    for (const auto& p : pairs) {
      uint32_t l = find(p.first), r = find(p.second);
      if (find(p.first + p.second) == UINT32_MAX) vocab.push_back(p.first + p.second);
      merges.emplace_back(l, r);
    }
  }
  uint32_t find(const std::string& s) const {
    for (uint32_t i = 0; i < vocab.size(); ++i)
      if (vocab[i] == s) return i;
    return UINT32_MAX;
  }
};

}  // namespace bpe_test
