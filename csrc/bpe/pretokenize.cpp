#include "bpe/pretokenize.h"

#include <stdexcept>

#include "bpe/pretokenize_impl.h"
#include "bpe/unicode.h"

namespace sparrow::bpe {

Pattern pattern_from_name(const std::string& name) {
  if (name == "gpt2" || name == "r50k" || name == "p50k" || name == "r50k_base" || name == "p50k_base")
    return Pattern::kGpt2;
  if (name == "cl100k" || name == "cl100k_base") return Pattern::kCl100k;
  if (name == "o200k" || name == "o200k_base") return Pattern::kO200k;
  if (name == "llama3") return Pattern::kLlama3;
  if (name == "qwen2") return Pattern::kQwen2;
  if (name == "deepseek_v3") return Pattern::kDeepSeekV3;
  throw std::invalid_argument("unknown split pattern '" + name + "' (known: gpt2, cl100k, o200k, llama3, qwen2, deepseek_v3)");
}

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kGpt2: return "gpt2";
    case Pattern::kCl100k: return "cl100k";
    case Pattern::kO200k: return "o200k";
    case Pattern::kLlama3: return "llama3";
    case Pattern::kQwen2: return "qwen2";
    case Pattern::kDeepSeekV3: return "deepseek_v3";
  }
  return "?";
}


namespace {
template <Pattern P>
void piece_ends_t(const unsigned char* s, size_t n, std::vector<size_t>& ends) {
  Splitter<P> split(s, n);
  for (size_t i = 0; i < n;) ends.push_back(i = split.next(i));
}
}  // namespace

void piece_ends(Pattern p, const unsigned char* s, size_t n, std::vector<size_t>& ends) {
  with_pattern(p, [&](auto pattern) { piece_ends_t<decltype(pattern)::value>(s, n, ends); });
}

bool is_valid_utf8(const unsigned char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    if (s[i] < 0x80) {
      ++i;
      continue;
    }
    Decoded d = decode_utf8(s, n, i);
    if (d.cp >= 0x110000) return false;
    i += d.len;
  }
  return true;
}

}  // namespace sparrow::bpe
