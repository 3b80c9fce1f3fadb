// Hand-written equivalents of the GPT-2, cl100k and o200k split regexes (no regex engine).
//
// Each function returns the end of the piece that the regex (as tiktoken / HF tokenizers execute it,
// leftmost-first alternation with backtracking) matches at position i. Pieces partition the input:
// every byte belongs to exactly one piece, for any input bytes (invalid UTF-8 counts as "other").
#pragma once

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

namespace sparrow::bpe {

enum class Pattern {
  // '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
  // (tiktoken r50k/p50k). HF's ByteLevel(use_regex=True) pattern, with \s+(?!\S)|\s+ and no \s++$, splits
  // every input identically (tests/test_tokenizer_pretokenize.py checks it), so one mode serves both.
  kGpt2,
  // '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
  kCl100k,
  // tiktoken's o200k_base pattern (case-aware words with contraction suffixes, \s*[\r\n]+, no \s++$).
  // Also the Split regex of GPT-OSS's tokenizer.json (the same regex).
  kO200k,
  // Llama-3's Split regex: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  // (cl100k without \s++$).
  kLlama3,
  // Qwen2/Qwen3's Split regex: Llama-3's with \p{N} (single digits) instead of \p{N}{1,3}.
  kQwen2,
  // DeepSeek-V3's three Splits (digit groups, CJK runs, a word/punctuation/whitespace regex), applied in
  // sequence; see deepseek_v3_piece in pretokenize_impl.h.
  kDeepSeekV3,
};

// Calls f(std::integral_constant<Pattern, P>{}) for the P equal to p: the one switch from a run-time
// pattern to the code instantiated per pattern (the pre-tokenizer's Splitter<P> and what is built on it).
template <class F>
inline void with_pattern(Pattern p, F&& f) {
  using P = Pattern;
  switch (p) {
    case P::kGpt2: return f(std::integral_constant<P, P::kGpt2>{});
    case P::kCl100k: return f(std::integral_constant<P, P::kCl100k>{});
    case P::kO200k: return f(std::integral_constant<P, P::kO200k>{});
    case P::kLlama3: return f(std::integral_constant<P, P::kLlama3>{});
    case P::kQwen2: return f(std::integral_constant<P, P::kQwen2>{});
    case P::kDeepSeekV3: return f(std::integral_constant<P, P::kDeepSeekV3>{});
  }
}

// "gpt2" (aliases r50k, p50k), "cl100k", "o200k", "llama3", "qwen2", "deepseek_v3"; throws std::invalid_argument otherwise.
Pattern pattern_from_name(const std::string& name);
const char* pattern_name(Pattern p);

// The end of each piece of s[0..n), in order.
void piece_ends(Pattern p, const unsigned char* s, size_t n, std::vector<size_t>& ends);

// Calls f(begin, end) for each piece of s[0..n).
template <class F>
inline void for_each_piece(Pattern p, const unsigned char* s, size_t n, F&& f) {
  std::vector<size_t> ends;
  piece_ends(p, s, n, ends);
  size_t b = 0;
  for (size_t e : ends) {
    f(b, e);
    b = e;
  }
}

}  // namespace sparrow::bpe
