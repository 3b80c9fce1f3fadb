// Unit tests of the BPE core: pre-tokenizer pieces, BPE merges, special tokens, loaders' error paths,
// and the str -> UTF-8 conversion the Python binding uses.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/json.h"
#include "bpe/pretokenize.h"
#include "bpe/pretokenize_impl.h"
#include "bpe/transcode.h"
#include "bpe/unicode.h"
#include "bpe_test_util.h"

using namespace sparrow::bpe;

namespace {

std::vector<std::string> pieces(Pattern p, const std::string& s) {
  std::vector<std::string> out;
  for_each_piece(p, reinterpret_cast<const unsigned char*>(s.data()), s.size(),
                 [&](size_t b, size_t e) { out.push_back(s.substr(b, e - b)); });
  return out;
}

using V = std::vector<std::string>;

void test_pretokenize() {
  // Expected pieces are those of the reference regexes (checked against tiktoken in the Python tests).
  CHECK((pieces(Pattern::kGpt2, "Hello world's 123 !!  x  ") == V{"Hello", " world", "'s", " 123", " !!", " ", " x", "  "}));
  CHECK((pieces(Pattern::kGpt2, "I'M") == V{"I", "'", "M"}));  // gpt2 contractions are case-sensitive
  CHECK((pieces(Pattern::kCl100k, "I'M 12345 \n\nfoo") == V{"I", "'M", " ", "123", "45", " \n\n", "foo"}));
  CHECK((pieces(Pattern::kCl100k, "x  \n ") == V{"x", "  \n "}));  // \s++$ takes the whole tail
  CHECK((pieces(Pattern::kCl100k, "'\xC5\xBF") == V{"'\xC5\xBF"}));  // (?i)s matches U+017F
  CHECK((pieces(Pattern::kCl100k, "\"hello") == V{"\"hello"}));
  CHECK((pieces(Pattern::kO200k, "HTTPServer camelCase") == V{"HTTPServer", " camel", "Case"}));
  CHECK((pieces(Pattern::kO200k, "HeLLo") == V{"He", "LLo"}));
  CHECK((pieces(Pattern::kO200k, "they'RE") == V{"they'RE"}));
  CHECK((pieces(Pattern::kO200k, "x  \n ") == V{"x", "  \n", " "}));  // no \s++$ in o200k
  CHECK((pieces(Pattern::kO200k, "a//b\n") == V{"a", "//", "b", "\n"}));
  CHECK((pieces(Pattern::kLlama3, "x  \n ") == V{"x", "  \n", " "}));  // Llama-3 has no \s++$
  CHECK((pieces(Pattern::kLlama3, "I'M 12345") == V{"I", "'M", " ", "123", "45"}));
  CHECK((pieces(Pattern::kQwen2, "x 12345") == V{"x", " ", "1", "2", "3", "4", "5"}));  // \p{N}: one digit
  CHECK(pattern_from_name("qwen2") == Pattern::kQwen2);
  // DeepSeek-V3: digit groups of three, CJK runs (split again at the katakana middle dot U+30FB, which is
  // punctuation), ASCII punctuation + ASCII letters, " ?" + punctuation runs.
  CHECK((pieces(Pattern::kDeepSeekV3, "(Hello) 12345 \xE4\xBD\xA0\xE5\xA5\xBD\xE3\x82\xAB\xE3\x83\xBB\xE3\x83\x8A") ==
         V{"(Hello", ")", " ", "123", "45", " ", "\xE4\xBD\xA0\xE5\xA5\xBD\xE3\x82\xAB", "\xE3\x83\xBB", "\xE3\x83\x8A"}));
  CHECK((pieces(Pattern::kDeepSeekV3, "a  1") == V{"a", "  ", "1"}));  // the run before a digit ends a segment
  CHECK(pattern_from_name("deepseek_v3") == Pattern::kDeepSeekV3);
  // Chinese is one letter run; the ideographic space is whitespace.
  CHECK((pieces(Pattern::kCl100k, "\xE4\xB8\xAD\xE6\x96\x87\xE3\x80\x80x") == V{"\xE4\xB8\xAD\xE6\x96\x87", "\xE3\x80\x80x"}));
  CHECK(pieces(Pattern::kGpt2, "").empty());
  CHECK_THROWS(pattern_from_name("gpt5"), std::invalid_argument);
  CHECK(pattern_from_name("cl100k_base") == Pattern::kCl100k);
  CHECK(char_flags('a') & kLetter);
  CHECK(char_flags(0x4E2D) & kLetter);
  CHECK(char_flags(0x0663) & kNumber);
  CHECK(char_flags(0x3000) & kSpace);
  CHECK(char_flags(0x85) & kSpace);
  CHECK(!(char_flags(0x1C) & kSpace));  // not White_Space, although Python's isspace() says so
  CHECK(char_flags(0x0301) & kMark);
  CHECK(char_flags(0x110000) == 0);
}

void test_bpe_merges() {
  bpe_test::TinyVocab v({{"a", "b"}, {"ab", "c"}, {"a", "a"}, {"aa", "aa"}, {" ", "ab"}});
  auto enc = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kGpt2, false, {});
  std::vector<uint32_t> ids;
  enc->encode_ordinary("abc ab aaaaa", ids);
  const uint32_t abc = v.find("abc"), sp_ab = v.find(" ab"), aaaa = v.find("aaaa");
  CHECK((ids == std::vector<uint32_t>{abc, sp_ab, static_cast<uint32_t>(' '), aaaa, static_cast<uint32_t>('a')}));
  // Equal-rank pairs merge leftmost first: "aaa" -> "aa" + "a".
  ids.clear();
  enc->encode_piece("aaa", ids);
  CHECK((ids == std::vector<uint32_t>{v.find("aa"), 'a'}));
  // The heap path (long pieces) agrees with the array path.
  std::string longa(5000, 'a');
  ids.clear();
  enc->encode_piece(longa, ids);
  CHECK(ids.size() == 1250);
  std::string round;
  enc->decode(ids.data(), ids.size(), round);
  CHECK(round == longa);
  std::string shorta(90, 'a');
  std::vector<uint32_t> small_ids;
  enc->encode_piece(shorta, small_ids);
  std::vector<uint32_t> big_ids;
  enc->encode_piece(std::string(200, 'a'), big_ids);
  CHECK(small_ids.size() == 23 && big_ids.size() == 50);
  uint32_t bad = static_cast<uint32_t>(v.vocab.size() + 3);
  std::string out;
  CHECK_THROWS(enc->decode(&bad, 1, out), std::out_of_range);
}

// The per-thread caches (the hot table of pieces up to 16 bytes, the piece cache up to 24) must give
// every encoder its own ids: two encoders whose merges give the same short pieces different ids,
// alternating on one thread over text with tens of thousands of distinct pieces (so slots are
// overwritten) and pieces at the very end of a text (the hot key's copying path), must each match
// the uncached BPE of every piece.
void test_piece_caches() {
  bpe_test::TinyVocab va({{"a", "b"}, {"ab", "c"}, {" ", "a"}, {"c", "a"}, {"ca", "b"}, {"b", "b"}});
  bpe_test::TinyVocab vb({{"b", "c"}, {"c", "a"}, {" ", "b"}, {"a", "bc"}, {"b", "b"}, {"a", "b"}});
  auto ea = Encoder::from_vocab_and_merges(va.vocab, va.merges, Pattern::kGpt2, false, {});
  auto eb = Encoder::from_vocab_and_merges(vb.vocab, vb.merges, Pattern::kCl100k, true, {});
  // No merges: a word of n letters is n ids, so every word over 6 letters has its ids in the spill ring,
  // and 60000 words wrap it many times (round 2 must notice the overwritten ones).
  bpe_test::TinyVocab vc(std::vector<std::pair<std::string, std::string>>{});
  auto ec = Encoder::from_vocab_and_merges(vc.vocab, vc.merges, Pattern::kGpt2, false, {});
  uint32_t state = 12345;
  auto rnd = [&]() {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  std::string text;
  for (int w = 0; w < 60000; ++w) {
    text += ' ';
    const int len = 1 + static_cast<int>(rnd() % 23);
    for (int k = 0; k < len; ++k) text += "abc"[rnd() % 3];
  }
  auto reference = [](const Encoder& e, const std::string& t) {
    std::vector<uint32_t> ids;
    for_each_piece(e.pattern(), reinterpret_cast<const unsigned char*>(t.data()), t.size(),
                   [&](size_t b, size_t end) { e.encode_piece(std::string_view(t).substr(b, end - b), ids); });
    return ids;
  };
  const std::vector<uint32_t> ref_a = reference(*ea, text), ref_b = reference(*eb, text);
  CHECK(ref_a != ref_b);
  std::vector<uint32_t> ref_c;
  for (unsigned char c : text) ref_c.push_back(c);
  for (int round = 0; round < 3; ++round) {
    for (const Encoder* e : {ea.get(), eb.get(), ec.get()}) {
      std::vector<uint32_t> ids;
      e->encode_ordinary(text, ids);
      CHECK(ids == (e == ea.get() ? ref_a : e == eb.get() ? ref_b : ref_c));
    }
  }
  // Short texts: every piece is near the end of its buffer.
  for (int k = 0; k < 2000; ++k) {
    const size_t at = rnd() % (text.size() - 40);
    const std::string t = text.substr(at, 1 + rnd() % 40);
    for (const Encoder* e : {ea.get(), eb.get()}) {
      std::vector<uint32_t> ids;
      e->encode_ordinary(t, ids);
      CHECK(ids == reference(*e, t));
    }
  }
}

void test_specials() {
  bpe_test::TinyVocab v(std::vector<std::pair<std::string, std::string>>{{"a", "b"}});
  const uint32_t n = static_cast<uint32_t>(v.vocab.size());
  auto enc = Encoder::from_vocab_and_merges(v.vocab, v.merges, Pattern::kCl100k, true,
                                            {{"<s>", n, true}, {"<s><t>", n + 1, true}, {"ab!", n + 2, false}});
  std::vector<uint32_t> ids;
  enc->encode("x<s><t>y", {1, 1, 0}, true, ids);  // leftmost-longest
  CHECK((ids == std::vector<uint32_t>{'x', n + 1, 'y'}));
  ids.clear();
  enc->encode("x<s><t>", {1, 0, 0}, false, ids);  // <s><t> not allowed: <s> then "<t>" as text
  CHECK(ids.size() == 5 && ids[1] == n);
  CHECK_THROWS(enc->encode("x<s><t>", {1, 0, 0}, true, ids), DisallowedSpecialError);
  ids.clear();
  enc->encode_ordinary("ab!<s>", ids);  // the non-special added token is always split out
  CHECK(ids.size() == 4 && ids[0] == n + 2 && ids[1] == '<');
  CHECK(enc->token_id("<s>") == n && enc->token_id("ab") == v.find("ab") && enc->token_id("zz") == -1);
}

void test_loaders() {
  CHECK_THROWS(json::parse("{\"a\": [1, 2,]}"), FormatError);
  CHECK_THROWS(json::parse("\"\\ud800\""), FormatError);
  CHECK_THROWS(json::parse(std::string(1000, '[')), FormatError);
  CHECK(json::parse("{\"k\": \"\\u00e9\\ud83d\\ude00\"}").get("k")->str == "\xC3\xA9\xF0\x9F\x98\x80");
  CHECK_THROWS(Encoder::from_hf_json("{}"), FormatError);
  CHECK_THROWS(Encoder::from_hf_json("{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}"), FormatError);
  const std::string hf = R"({"added_tokens": [{"id": 3, "content": "<e>", "special": true}],
    "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<e>": 3}, "merges": [["a", "b"]]}})";
  auto enc = Encoder::from_hf_json(hf);
  std::vector<uint32_t> ids;
  enc->encode("abab<e>", {1}, true, ids);
  CHECK((ids == std::vector<uint32_t>{2, 2, 3}));
  ids.clear();
  enc->encode_ordinary("zab", ids);  // bytes without a token are dropped, as HF does without unk_token
  CHECK((ids == std::vector<uint32_t>{2}));
  CHECK_THROWS(Encoder::from_tiktoken("YQ== 0\n", Pattern::kGpt2, {}), FormatError);  // lacks 255 bytes
  CHECK_THROWS(Encoder::from_tiktoken("@@@@ 0\n", Pattern::kGpt2, {}), FormatError);
  CHECK_THROWS(Encoder::from_tiktoken("", Pattern::kGpt2, {}), FormatError);
}

// The pre-tokenizer's 3-byte fast path classifies every 3-byte sequence as the general decoder does: each
// lead byte E0-EF with every pair of following bytes, continuation bytes or not (overlong forms, surrogates,
// truncated and broken sequences must be left to the general path), at the end of the text or before more.
void test_three_byte_flags() {
  size_t mismatches = 0;
  for (unsigned b0 = 0xE0; b0 <= 0xEF; ++b0)
    for (unsigned b1 = 0; b1 < 256; ++b1)
      for (unsigned b2 = 0; b2 < 256; ++b2) {
        const unsigned char s[4] = {static_cast<unsigned char>(b0), static_cast<unsigned char>(b1),
                                    static_cast<unsigned char>(b2), 'x'};
        for (size_t n : {size_t{2}, size_t{3}, size_t{4}}) {
          const Decoded d = decode_utf8(s, n, 0);
          const uint8_t want = d.len == 3 ? char_flags(d.cp) : piece::kNot3;
          mismatches += piece::flags3(s, n, 0) != want;
        }
      }
  CHECK(mismatches == 0);
  // Blocks that mix classes go through the two-stage table: U+3000 (space) and U+3001 (punctuation),
  // U+FF10 (digit) and U+FF21 (letter), U+1E00/U+1E01 (upper/lower case).
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xE3\x80\x80"), 3, 0) == char_flags(0x3000));
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xE3\x80\x81"), 3, 0) == char_flags(0x3001));
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xEF\xBC\x90"), 3, 0) == char_flags(0xFF10));
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xEF\xBC\xA1"), 3, 0) == char_flags(0xFF21));
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xE1\xB8\x80"), 3, 0) == char_flags(0x1E00));
  CHECK(piece::flags3(reinterpret_cast<const unsigned char*>("\xE1\xB8\x81"), 3, 0) == char_flags(0x1E01));
}


// The bulk scan's byte classes (SSE2 range compares) are the Unicode tables' classes of ASCII: letter,
// digit, White_Space split into space / \r \n / the rest, and "other" for the remaining bytes; for
// DeepSeek-V3, "other" splits into controls (neither \p{P}/\p{S} nor White_Space) and punctuation.
void test_bulk_scan_classes() {
  for (unsigned base = 0; base < 256; base += 64) {
    unsigned char window[64];
    for (unsigned j = 0; j < 64; ++j) window[j] = static_cast<unsigned char>(base + j);
    const piece::AsciiClasses c = piece::classify64<true>(window);
    for (unsigned j = 0; j < 64; ++j) {
      const unsigned b = base + j;
      const uint64_t bit = uint64_t{1} << j;
      CHECK(((c.high & bit) != 0) == (b >= 0x80));
      if (b >= 0x80) continue;
      const uint8_t f = char_flags(b);
      CHECK(((c.letter & bit) != 0) == ((f & kLetter) != 0));
      CHECK(((c.digit & bit) != 0) == ((f & kNumber) != 0));
      const bool white = (c.space | c.tab | c.crlf) & bit;
      CHECK(white == ((f & kSpace) != 0));
      CHECK(((c.crlf & bit) != 0) == (b == '\r' || b == '\n'));
      CHECK(((c.space & bit) != 0) == (b == ' '));
      CHECK(((c.quote & bit) != 0) == (b == '\''));
      const bool other = !(f & (kLetter | kNumber | kSpace));
      CHECK((other && (c.ctrl & bit)) == (other && !(f & kPunctSym)));
    }
  }
}


// What the transcoders must match.
std::string utf8_reference(const std::vector<uint32_t>& cps) {
  std::string out;
  for (uint32_t c : cps) bpe_test::put_utf8(out, c);
  return out;
}

// Runs the transcoder for the narrowest width that holds cps (or the one asked for) into a buffer of
// exactly utf8_capacity bytes (the sanitizer build catches a write past it); "!" for a surrogate.
std::string transcoded(const std::vector<uint32_t>& cps, size_t width) {
  std::vector<unsigned char> dst(utf8_capacity(cps.size(), width));
  size_t n = 0;
  if (width == 1) {
    std::vector<uint8_t> s(cps.begin(), cps.end());
    n = utf8_from_latin1(s.data(), s.size(), dst.data());
  } else if (width == 2) {
    std::vector<uint16_t> s(cps.begin(), cps.end());
    n = utf8_from_ucs2(s.data(), s.size(), dst.data());
  } else {
    n = utf8_from_ucs4(cps.data(), cps.size(), dst.data());
  }
  if (n == kHasSurrogate) return "!";
  CHECK(n + 16 <= dst.size());
  return std::string(reinterpret_cast<const char*>(dst.data()), n);
}

void test_transcode() {
  // Every code point alone and at each offset in an 8/16-unit block among ASCII, 1-, 2- and 3-byte
  // neighbours, in every width that can hold it.
  std::vector<uint32_t> fillers = {'a', 0xE9, 0x4E2D};
  for (uint32_t c = 0; c < 0x110000; c += (c < 0x10000 ? 1 : 97)) {
    const bool surrogate = c >= 0xD800 && c <= 0xDFFF;
    for (size_t width : {1, 2, 4}) {
      if ((width == 1 && c > 0xFF) || (width == 2 && c > 0xFFFF)) continue;
      for (uint32_t f : fillers) {
        if ((width == 1 && f > 0xFF)) continue;
        for (size_t at : {0, 7, 15}) {
          if (c % 61 != 0 && at != 7) continue;  // all offsets for a sample, one for the rest
          std::vector<uint32_t> cps(17, f);
          cps[at] = c;
          const std::string want = surrogate ? "!" : utf8_reference(cps);
          const std::string got = transcoded(cps, width);
          if (got != want) {
            std::fprintf(stderr, "transcode U+%04X width %zu filler U+%04X at %zu\n", c, width, f, at);
            CHECK(got == want);
            return;
          }
        }
      }
    }
  }
  // Random texts of every length up to 80 from runs of one class (ASCII, Latin-1, 2-byte, 3-byte,
  // astral, surrogates rarely), so that whole blocks of one class and blocks that mix them both occur.
  std::mt19937 rng(7);
  auto pick = [&](int cls) -> uint32_t {
    switch (cls) {
      case 0: return rng() % 0x80;
      case 1: return 0x80 + rng() % 0x80;
      case 2: return 0x100 + rng() % 0x700;
      case 3: { uint32_t c = 0x800 + rng() % 0xF800; return (c >= 0xD800 && c <= 0xDFFF) ? c + 0x800 : c; }
      case 4: return 0x10000 + rng() % 0x100000;
      default: return 0xD800 + rng() % 0x800;
    }
  };
  for (int iter = 0; iter < 20000; ++iter) {
    const size_t n = rng() % 81;
    const int max_cls = static_cast<int>(rng() % 5);  // the widest class: width 1, 2 (up to 3) or 4
    std::vector<uint32_t> cps;
    while (cps.size() < n) {
      int cls = static_cast<int>(rng() % (max_cls + 1));
      if (rng() % 200 == 0 && max_cls >= 2) cls = 5;
      for (size_t run = 1 + rng() % 20; run && cps.size() < n; --run) cps.push_back(pick(cls));
    }
    const size_t width = max_cls <= 1 ? 1 : max_cls <= 3 ? 2 : 4;
    bool surrogate = false;
    for (uint32_t c : cps) surrogate |= c >= 0xD800 && c <= 0xDFFF;
    const std::string want = surrogate ? "!" : utf8_reference(cps);
    for (size_t w = width; w <= 4; w *= 2) {
      if (transcoded(cps, w) != want) {
        std::fprintf(stderr, "transcode: random text %d (width %zu) differs\n", iter, w);
        CHECK(false);
        return;
      }
    }
  }
}

}  // namespace

int main() {
  test_pretokenize();
  test_three_byte_flags();
  test_bulk_scan_classes();
  test_bpe_merges();
  test_piece_caches();
  test_specials();
  test_loaders();
  test_transcode();
  return bpe_test::finish("test_bpe_core");
}
