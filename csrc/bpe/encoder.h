// Byte-level BPE encoder: tokenizer.json (HF) and .tiktoken vocabularies, byte-exact with both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bpe/pretokenize.h"

namespace sparrow::bpe {

// Thrown by encode() when the text contains a special token that the caller did not allow.
class DisallowedSpecialError : public std::runtime_error {
 public:
  DisallowedSpecialError(const std::string& token)
      : std::runtime_error("text contains the disallowed special token " + token), token_(token) {}
  const std::string& token() const { return token_; }

 private:
  std::string token_;
};

// Malformed vocabulary files.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SpecialToken {
  std::string text;
  uint32_t id;
  // HF "special" flag. Non-special added tokens are always split out (as HF does); special ones only
  // when the caller allows them.
  bool special;
  // HF "normalized" flag (its default is !special). HF extracts normalized=false tokens first, then
  // looks for normalized=true ones in the text between them; two passes, not one leftmost-longest.
  bool normalized = false;
};

// HF's Digits pre-tokenizer when it comes before the split regex: none, each run of \p{N} characters its
// own segment (individual_digits=false), or each \p{N} character (individual_digits=true). The regex
// then splits every segment on its own, as HF's Sequence does.
enum class DigitSplit : uint8_t { kNone, kRuns, kEach };

class Encoder {
 public:
  // tokenizer.json contents (byte-level BPE: model.type BPE + ByteLevel pre-tokenizer).
  static std::unique_ptr<Encoder> from_hf_json(std::string_view json);
  // .tiktoken contents ("base64 rank" lines).
  static std::unique_ptr<Encoder> from_tiktoken(std::string_view contents, Pattern pattern,
                                                const std::vector<std::pair<std::string, uint32_t>>& specials);
  // Built in code, for tests: vocab[id] = bytes; merges as (left, right) ids in priority order; the
  // merged token is the vocabulary entry of left+right bytes.
  static std::unique_ptr<Encoder> from_vocab_and_merges(const std::vector<std::string>& vocab,
                                                        const std::vector<std::pair<uint32_t, uint32_t>>& merges,
                                                        Pattern pattern, bool whole_piece_lookup,
                                                        const std::vector<SpecialToken>& specials);
  ~Encoder();

  // Ignores special tokens (they are encoded as ordinary text), but splits non-special added tokens.
  void encode_ordinary(std::string_view text, std::vector<uint32_t>& out) const;
  // allowed[k] says whether specials()[k] is split out; a special that is neither allowed nor
  // skipped by check_disallowed=false raises DisallowedSpecialError when it occurs in the text.
  void encode(std::string_view text, const std::vector<char>& allowed, bool check_disallowed,
              std::vector<uint32_t>& out) const;
  // BPE of one piece that the pre-tokenizer produced (no splitting).
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;

  // Appends the bytes of the ids; throws std::out_of_range for ids that are not in the vocabulary.
  void decode(const uint32_t* ids, size_t n, std::string& out) const;

  size_t vocab_size() const { return id_bytes_.size(); }  // max id + 1
  bool has_id(uint32_t id) const { return id < id_kind_.size() && id_kind_[id] != 0; }
  const std::string& id_bytes(uint32_t id) const { return id_bytes_.at(id); }
  // The id of a token's bytes (regular or special), or -1.
  int64_t token_id(std::string_view bytes) const;
  const std::vector<SpecialToken>& specials() const { return specials_; }
  Pattern pattern() const { return pattern_; }
  DigitSplit digit_split() const { return digits_; }
  // "" or "NFC": the tokenizer.json normalizer, which callers must apply to text before encoding (the
  // Python layer does; added tokens with normalized=false are matched in the raw text all the same
  // when the text is already normalized, the only case it lets through).
  const std::string& normalizer() const { return normalizer_; }
  size_t num_merges() const { return num_merges_; }

 private:
  Encoder();
  struct Tables;
  void finish(const std::vector<SpecialToken>& specials);
  void build_char_tokens();
  void keep_last_merges(const std::vector<uint8_t>& several);  // .tiktoken: one pair per token
  void add_token(uint32_t id, std::string bytes, uint8_t kind);
  void add_merge(uint32_t left, uint32_t right, uint32_t rank, uint32_t merged);
  void encode_span(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const;
  // The split pattern alone (encode_span applies the digit split first).
  void encode_pattern(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const;
  template <Pattern P>
  void encode_span_t(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const;
  // Splits out the added tokens of `mask` (leftmost-longest) and encodes the text between them.
  void encode_added(std::string_view seg, const std::vector<char>& mask, bool any, std::vector<uint32_t>& out) const;
  void bpe(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const;
  // `hash` is hash_bytes(s, n) (only read when whole_piece_lookup_ or self_encoding_ is set).
  void bpe_hashed(const unsigned char* s, size_t n, uint64_t hash, std::vector<uint32_t>& out) const;
  // Pieces up to kSmallPiece bytes: BPE over arrays on the stack; returns how many ids it wrote to dst (at
  // most n, which dst must have room for). Longer ones go to bpe_large.
  static constexpr size_t kSmallPiece = 96;
  size_t bpe_small(const unsigned char* s, size_t n, uint64_t hash, uint32_t* dst) const;
  // The piece's own id where it stands for itself (whole-piece lookup), else -1.
  int64_t whole_piece(const unsigned char* s, size_t n, uint64_t hash) const;
  void bpe_large(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const;
  // Leftmost-longest special-token match at or after `from`: (position, special index) or (npos, 0).
  std::pair<size_t, size_t> find_special(std::string_view text, size_t from, const std::vector<char>& usable) const;

  Pattern pattern_ = Pattern::kGpt2;
  DigitSplit digits_ = DigitSplit::kNone;
  std::string normalizer_;
  bool whole_piece_lookup_ = false;
  std::vector<std::string> id_bytes_;
  std::vector<uint8_t> id_kind_;  // 0 missing, 1 regular, 2 added/special
  // Without whole-piece lookup: self_encoding_[id] says BPE of token id's bytes is [id] (see finish).
  std::vector<uint8_t> self_encoding_;
  // (rank << 32 | merged id) of the pair of single-byte tokens (a, b) at a << 8 | b; rank ~0u when none.
  std::vector<uint64_t> byte_pairs_;
  uint32_t byte_id_[256];
  bool byte_present_[256];
  // char_token_[cp] (cp < 0x10000): the one or two tokens that a 2- or 3-byte UTF-8 character becomes
  // before any pair across its edges can merge, so BPE may start from them instead of its bytes, and next
  // to which neighbours (see build_char_tokens); `first` is ~0u for the others. Empty when none qualifies.
  // 32 bytes, so that a character costs one cache line.
  struct alignas(32) CharToken {
    uint32_t first;
    uint32_t second;      // ~0u when the character is one token
    uint64_t after[3];    // which left / right neighbours allow it (kCharLeftAny, char_after_bit, ...)
  };
  std::vector<CharToken> char_token_;
  size_t num_merges_ = 0;
  std::vector<SpecialToken> specials_;
  std::unique_ptr<Tables> t_;
  uint32_t uid_;  // distinguishes encoders in the per-thread piece cache
  static constexpr size_t kIdSlack = size_t{1} << 20;
  size_t id_limit_ = kIdSlack;  // ids at or above it are rejected as corrupt (see add_token)
};

}  // namespace sparrow::bpe
