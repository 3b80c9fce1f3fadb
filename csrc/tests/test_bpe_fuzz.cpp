// Randomized test of the BPE core, meant to run under ASan/UBSan: random bytes and random UTF-8 through
// the three pre-tokenizers and the encoder. Invariants: pieces are non-empty and partition the input;
// decode(encode(x)) == x; the array and heap BPE paths agree.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/pretokenize.h"
#include "bpe/unicode.h"
#include "bpe_test_util.h"

using namespace sparrow::bpe;

namespace {

// Code points drawn from the classes the patterns care about, plus anything.
uint32_t random_cp(std::mt19937& rng) {
  static const uint32_t picks[] = {' ', ' ', '\n', '\r', '\t', '\'', 's', 'S', 'l', 'a', 'Z', '1', '/', '!', '<',
                                   0xA0, 0x85, 0x3000, 0x2028, 0x17F, 0x1C5, 0x2B0, 0x301, 0x200D, 0x1F44D, 0x663};
  switch (rng() % 6) {
    case 0: return picks[rng() % (sizeof(picks) / sizeof(picks[0]))];
    case 1: return 0x20 + rng() % 0x5F;
    case 2: return 0x4E00 + rng() % 0x5000;  // CJK
    case 3: return 0x600 + rng() % 0x100;    // Arabic
    default: {
      uint32_t cp = rng() % 0x110000;
      return (cp >= 0xD800 && cp <= 0xDFFF) ? 0xFFFD : cp;
    }
  }
}

// Mostly ASCII, up to ~400 bytes: what the pre-tokenizer's 64-byte bulk scan takes (windows at every
// offset, a byte >= 0x80 now and then to end one early).
std::string random_ascii_text(std::mt19937& rng) {
  static const char* const kParts[] = {"the", " the", "Don", "'s", "'T", "'ll", "'x", "'", " '", " ", "    ",
                                       "\t", "\n", "\r\n", " \n", "\n\n  ", "(", "...", " (", "/", "\n/",
                                       "aB", "HTML", "1", "123", "12345", "\x0b", "\x00", "\xc3\xa9"};
  std::string s;
  const size_t parts = rng() % 120;
  for (size_t i = 0; i < parts; ++i) s += kParts[rng() % (sizeof(kParts) / sizeof(kParts[0]))];
  return s;
}

std::string random_text(std::mt19937& rng, bool valid_utf8) {
  if (valid_utf8 && rng() % 3 == 0) return random_ascii_text(rng);
  std::string s;
  const size_t len = rng() % 64;
  for (size_t i = 0; i < len; ++i) {
    if (valid_utf8) {
      uint32_t cp = random_cp(rng);
      size_t repeat = (rng() % 8 == 0) ? rng() % 20 : 1;  // runs: whitespace, digits, one letter
      for (size_t k = 0; k < repeat; ++k) bpe_test::put_utf8(s, cp);
    } else {
      s += static_cast<char>(rng() & 0xFF);
    }
  }
  return s;
}

// Textbook BPE: repeatedly merge the leftmost pair of lowest rank.
std::vector<uint32_t> naive_bpe(const bpe_test::TinyVocab& v, const std::string& piece) {
  std::vector<uint32_t> sym;
  for (unsigned char c : piece) sym.push_back(c);
  while (true) {
    size_t best_rank = SIZE_MAX, best_pos = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      for (size_t r = 0; r < v.merges.size() && r < best_rank; ++r) {
        if (v.merges[r].first == sym[i] && v.merges[r].second == sym[i + 1]) {
          best_rank = r;
          best_pos = i;
          break;
        }
      }
    }
    if (best_rank == SIZE_MAX) return sym;
    sym[best_pos] = v.find(v.vocab[sym[best_pos]] + v.vocab[sym[best_pos + 1]]);
    sym.erase(sym.begin() + static_cast<long>(best_pos) + 1);
  }
}

// BPE that starts a multi-byte character as its one or two tokens (Encoder::build_char_tokens) must give
// the ids of textbook BPE from bytes. Vocabularies over a few 2- and 3-byte characters, a space, a letter
// and two control characters, whose merges (inside characters, across their edges at every byte, between
// whole characters) come in random order, so that some characters qualify everywhere, some only after
// some bytes, some nowhere, and some end as two tokens; random pieces of up to 30 characters through the
// array path.
void fuzz_char_tokens(std::mt19937& rng) {
  const std::vector<std::string> units = {"\xC3\xA9", "\xC3\xB6", "\xE4\xB8\xAD", "\xE6\x96\x87", " ", "a", "\n", "\t"};
  std::vector<std::pair<std::string, std::string>> candidates = {
      {"\xC3", "\xA9"}, {"\xC3", "\xB6"}, {"\xE4", "\xB8"}, {"\xE4\xB8", "\xAD"}, {"\xB8", "\xAD"}, {"\xE4", "\xB8\xAD"},
      {"\xE6", "\x96"}, {"\xE6\x96", "\x87"}, {"\x96", "\x87"}, {"\xE6", "\x96\x87"},
      {"\xA9", "\xC3"}, {"\xAD", "\xE4"}, {"\x87", "\xE4"}, {"\xAD", "\xE6"}, {"\xB6", "\xE6"}, {" ", "\xC3"}, {" ", "\xE4"},
      {"\xA9", " "}, {"\xAD", "a"}, {"a", "\xE6"}, {"\xE4\xB8", "\xAD\xE4"},
      {"\xC3\xA9", "\xC3\xB6"}, {"\xE4\xB8\xAD", "\xE6\x96\x87"}, {"\xE6\x96\x87", "\xE4\xB8\xAD"},
      {"\xE4\xB8\xAD", " "}, {" ", "\xE4\xB8\xAD"}, {"a", "\xC3\xA9"}, {"\xC3\xB6", "\xE4\xB8\xAD"}, {"\xAD", "\xE4\xB8"},
      {"a", " "}, {" ", "a"}, {"\xC3\xA9", " "}, {"\xE6\x96\x87", "a"}, {"\xC3\xB6", "\xE6"},
      {"\n", "\xE4"}, {"\t", "\xE6"}, {"\t", "\xC3"}, {"\xAD", "\n"}, {"\n", "\xE4\xB8\xAD"}};
  for (int round = 0; round < 600; ++round) {
    std::shuffle(candidates.begin(), candidates.end(), rng);
    bpe_test::TinyVocab v({});
    for (const auto& c : candidates)
      for (const std::string& t : {c.first, c.second, c.first + c.second})
        if (v.find(t) == UINT32_MAX) v.vocab.push_back(t);
    v.merges.clear();
    for (size_t k = 0; k < candidates.size(); ++k)
      if (rng() % 4) v.merges.emplace_back(v.find(candidates[k].first), v.find(candidates[k].second));
    auto enc = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kGpt2, false, {});
    for (int k = 0; k < 40; ++k) {
      std::string piece;
      const size_t len = 1 + rng() % 30;
      for (size_t u = 0; u < len; ++u) piece += units[rng() % units.size()];
      std::vector<uint32_t> got;
      enc->encode_piece(piece, got);
      CHECK(got == naive_bpe(v, piece));
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  // A vocabulary with merges over ASCII letters/space and a few UTF-8 byte pairs.
  std::vector<std::pair<std::string, std::string>> merges;
  const std::string letters = " aslSZ1'\n";
  for (char a : letters)
    for (char b : letters) merges.emplace_back(std::string(1, a), std::string(1, b));
  merges.emplace_back("\xE4", "\xB8");
  merges.emplace_back("\xE4\xB8", "\xAD");
  merges.emplace_back("aa", "aa");
  merges.emplace_back("  ", "  ");
  bpe_test::TinyVocab v(merges);
  auto hf_like = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kGpt2, false, {{"<|e|>", 9999, true}});
  auto tt_like = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kO200k, true, {});
  auto cl_like = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kCl100k, true, {});
  const Encoder* encoders[] = {hf_like.get(), tt_like.get(), cl_like.get()};

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  size_t iterations = 0;
  while (std::chrono::steady_clock::now() < deadline || iterations < 200) {
    ++iterations;
    const bool valid = rng() % 4 != 0;
    const std::string text = random_text(rng, valid);
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    for (Pattern p : {Pattern::kGpt2, Pattern::kCl100k, Pattern::kO200k, Pattern::kLlama3, Pattern::kQwen2,
                      Pattern::kDeepSeekV3}) {
      size_t expect = 0;
      bool ok = true;
      for_each_piece(p, s, text.size(), [&](size_t b, size_t e) {
        ok &= (b == expect && e > b && e <= text.size());
        expect = e;
      });
      CHECK(ok && expect == text.size());
    }
    if (valid) CHECK(is_valid_utf8(s, text.size()));
    for (const Encoder* enc : encoders) {
      std::vector<uint32_t> ids;
      enc->encode(text, std::vector<char>(enc->specials().size(), 1), true, ids);
      std::string back;
      enc->decode(ids.data(), ids.size(), back);
      CHECK(back == text);  // the vocabulary has all 256 bytes, so even invalid UTF-8 round-trips
    }
    // Long pieces take the heap path; short ones the array path. Both must equal a naive BPE (slow, so
    // on every 8th input only).
    if (iterations % 8) continue;
    std::string piece;
    const size_t plen = (rng() % 2) ? 150 + rng() % 100 : 2 + rng() % 60;
    for (size_t k = 0; k < plen; ++k) piece += letters[rng() % letters.size()];
    std::vector<uint32_t> got;
    hf_like->encode_piece(piece, got);
    CHECK(got == naive_bpe(v, piece));
  }
  std::printf("fuzzed %zu inputs\n", iterations);
  fuzz_char_tokens(rng);

  // Malformed vocabulary files: truncations and byte flips of valid ones must throw FormatError (or
  // load, when the damage happens to be harmless), never crash.
  const std::string hf = R"({"added_tokens": [{"id": 3, "content": "<e>", "special": true, "normalized": false}],
    "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "model": {"type": "BPE", "ignore_merges": false, "vocab": {"a": 0, "b": 1, "ab": 2, "<e>": 3, "\u0120": 4},
              "merges": ["a b", ["ab", "ab"]]}})";
  std::string tiktoken;
  for (int b = 0; b < 256; ++b) {
    static const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    tiktoken += digits[b >> 2];
    tiktoken += digits[(b & 3) << 4];
    tiktoken += "== " + std::to_string(b) + "\n";
  }
  tiktoken += "YWI= 256\n";  // "ab"
  size_t loaded = 0, rejected = 0;
  for (int round = 0; round < 3000; ++round) {
    const bool use_hf = round % 2 == 0;
    std::string doc = use_hf ? hf : tiktoken;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < edits && !doc.empty(); ++k) {
      switch (rng() % 3) {
        case 0: doc.resize(rng() % doc.size()); break;
        case 1: doc[rng() % doc.size()] = static_cast<char>(rng() & 0xFF); break;
        default: doc.insert(doc.begin() + static_cast<long>(rng() % doc.size()), static_cast<char>(rng() & 0xFF));
      }
    }
    try {
      auto enc = use_hf ? Encoder::from_hf_json(doc) : Encoder::from_tiktoken(doc, Pattern::kGpt2, {{"<e>", 5000}});
      std::vector<uint32_t> ids;
      enc->encode("ab abab <e> \xE4\xB8\xAD", std::vector<char>(enc->specials().size(), 1), false, ids);
      std::string back;
      enc->decode(ids.data(), ids.size(), back);
      ++loaded;
    } catch (const FormatError&) {
      ++rejected;
    }
  }
  std::printf("malformed vocabularies: %zu loaded, %zu rejected with FormatError\n", loaded, rejected);
  CHECK(loaded > 0 && rejected > 0);
  return bpe_test::finish("test_bpe_fuzz");
}
