#include "bpe/encoder.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <queue>
#include <unordered_map>

#if defined(__SSE2__)
#include <emmintrin.h>
#if defined(__SSE4_1__)
#include <smmintrin.h>
#endif
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bpe/json.h"
#include "bpe/pretokenize_impl.h"
#include "bpe/unicode.h"

namespace sparrow::bpe {

namespace {

inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline uint64_t mix(uint64_t h) {
  h ^= h >> 32;
  h *= 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return h;
}

// Fast hash of short byte strings (pieces are mostly < 16 bytes).
inline uint64_t hash_bytes(const unsigned char* p, size_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ (n * 0x9E3779B97F4A7C15ull);
  while (n >= 8) {
    h = (h ^ load64(p)) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  // The 1-7 byte tail without a byte-by-byte copy: two overlapping 4-byte loads, or for 1-3 bytes the
  // first, middle and last byte (together they cover every byte; the length is mixed in above).
  uint64_t w;
  if (n >= 4) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + n - 4, 4);
    w = (static_cast<uint64_t>(lo) << 32) | hi;
  } else if (n) {
    w = (static_cast<uint64_t>(p[0]) << 16) | (static_cast<uint64_t>(p[n >> 1]) << 8) | p[n - 1];
  } else {
    return mix(h);
  }
  h = (h ^ w ^ (static_cast<uint64_t>(n) << 59)) * 0x94D049BB133111EBull;
  return mix(h);
}

inline size_t next_pow2(size_t n) {
  size_t c = 16;
  while (c < n) c <<= 1;
  return c;
}

// Zero-filled memory for the tables the encoder probes at random (the vocabulary's pair and token
// tables, megabytes each, and the per-thread piece cache). On 4 KiB pages nearly every probe of a
// table that size also misses the TLB; on Linux a region of 2 MiB or more is mapped on its own,
// 2 MiB-aligned, and advised for transparent huge pages before anything touches it, so it faults in
// as a few huge pages (under the usual `madvise` THP policy). Smaller ones, or where mapping fails,
// come from calloc. Either way fresh pages are zero and untouched ones cost nothing.
class ZeroedRegion {
 public:
  static constexpr size_t kHuge = size_t{2} << 20;
  ZeroedRegion() = default;
  explicit ZeroedRegion(size_t bytes) {
    if (bytes == 0) return;
#if defined(__linux__)
    if (bytes >= kHuge) {
      const size_t size = (bytes + kHuge - 1) & ~(kHuge - 1);
      void* base = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base != MAP_FAILED) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(base);
        const uintptr_t start = (b + kHuge - 1) & ~uintptr_t{kHuge - 1};
        if (start > b) munmap(base, start - b);
        if (b + size + kHuge > start + size) munmap(reinterpret_cast<void*>(start + size), b + size + kHuge - start - size);
        madvise(reinterpret_cast<void*>(start), size, MADV_HUGEPAGE);
        p_ = reinterpret_cast<void*>(start);
        bytes_ = size;
        mapped_ = true;
        return;
      }
    }
#endif
    raw_ = std::calloc(1, bytes + 64);
    if (!raw_) throw std::bad_alloc();
    p_ = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t{63});
    bytes_ = bytes;
  }
  ZeroedRegion(const ZeroedRegion&) = delete;
  ZeroedRegion& operator=(const ZeroedRegion&) = delete;
  ZeroedRegion(ZeroedRegion&& o) noexcept { swap(o); }
  ZeroedRegion& operator=(ZeroedRegion&& o) noexcept {
    ZeroedRegion(std::move(o)).swap(*this);
    return *this;
  }
  ~ZeroedRegion() {
#if defined(__linux__)
    if (mapped_) {
      munmap(p_, bytes_);
      return;
    }
#endif
    std::free(raw_);
  }
  void swap(ZeroedRegion& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(raw_, o.raw_);
    std::swap(bytes_, o.bytes_);
    std::swap(mapped_, o.mapped_);
  }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
  void* raw_ = nullptr;
  size_t bytes_ = 0;
  bool mapped_ = false;
};

// A fixed-size array of trivially copyable T in a ZeroedRegion.
template <class T>
class Table {
 public:
  void assign(size_t n, const T& fill) {
    ZeroedRegion r(n * sizeof(T));
    region_.swap(r);
    n_ = n;
    T* p = data();
    for (size_t i = 0; i < n; ++i) p[i] = fill;
  }
  void swap(Table& o) noexcept {
    region_.swap(o.region_);
    std::swap(n_, o.n_);
  }
  size_t size() const { return n_; }
  T* data() const { return static_cast<T*>(region_.get()); }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }
  T* begin() const { return data(); }
  T* end() const { return data() + n_; }

 private:
  ZeroedRegion region_;
  size_t n_ = 0;
};

constexpr uint32_t kNoRank = 0xFFFFFFFFu;
// Merge ranks stay below kMaxRank (16.7M; the largest vocabularies have a few hundred thousand): bpe_small
// packs a rank and a 7-bit position into one non-negative int32.
constexpr uint32_t kMaxRank = (1u << 24) - 1;
// Encoder::char_token_ entries: CharToken::after has one bit per last byte b < 0xC0 of the left neighbour
// (char_after_bit: bit b & 63 of after[b >> 6]; bytes below 0x20 share bit 31 of after[0]) that the
// character may start as its tokens after. after[0]'s low bits, which no byte uses, hold the rest: after a
// left neighbour ending in a lead byte (malformed UTF-8) too; before any right neighbour; before a right
// neighbour starting with a lead byte, by which one (lead_group: E0-EF one each, C0-DF, F0-FF).
constexpr uint64_t kCharLeftAny = uint64_t{1} << 0;
constexpr uint64_t kCharRightAny = uint64_t{1} << 1;
constexpr int kCharLeadShift = 2;
constexpr int kLeadGroups = 18;
constexpr int kCharControlBit = 31;
static_assert(kCharLeadShift + kLeadGroups <= kCharControlBit, "flags overlap the byte bits");
inline int char_after_bit(unsigned char b) { return b < 0x20 ? kCharControlBit : b & 63; }
inline int lead_group(unsigned char b) { return b < 0xE0 ? 16 : b < 0xF0 ? b - 0xE0 : 17; }

// One bit per hash bucket, set for every key of a table: a clear bit proves a key absent without the
// table's cache miss. The bit comes from the hash's high bits (from kShift up), not the low bits that
// pick the table's slot, so the two are independent.
template <int kShift>
struct BucketFilter {
  Table<uint64_t> words;
  size_t mask = 0;  // in bits
  void reset(size_t keys, size_t bits_per_key) {
    const size_t bits = std::max<size_t>(next_pow2(keys * bits_per_key), 4096);
    words.assign(bits / 64, 0);
    mask = bits - 1;
  }
  size_t bit(uint64_t h) const { return static_cast<size_t>(h >> kShift) & mask; }
  void add(uint64_t h) {
    const size_t b = bit(h);
    words[b >> 6] |= uint64_t{1} << (b & 63);
  }
  bool may_contain(uint64_t h) const {
    const size_t b = bit(h);
    return (words[b >> 6] >> (b & 63)) & 1;
  }
  void prefetch(uint64_t h) const { __builtin_prefetch(&words[bit(h) >> 6]); }
};

}  // namespace

// Open-addressing tables: (left_id, right_id) -> (rank, merged_id), and token bytes -> id.
struct Encoder::Tables {
  struct PairSlot {
    uint64_t key;  // left << 32 | right; kEmpty when free
    uint32_t rank;
    uint32_t merged;
  };
  static constexpr uint64_t kEmpty = ~0ull;
  Table<PairSlot> pairs;
  size_t pair_mask = 0;
  size_t pair_count = 0;

  // Tokens up to kInline bytes (nearly all) are compared in the slot itself, saving the cache miss of
  // fetching the token's std::string on every whole-piece lookup.
  static constexpr size_t kInline = 16;
  struct TokSlot {
    uint64_t hash;
    uint32_t id;  // kNoRank when free
    uint32_t len;
    unsigned char bytes[kInline];
  };
  Table<TokSlot> toks;
  size_t tok_mask = 0;
  size_t tok_count = 0;
  const std::vector<std::string>* id_bytes = nullptr;

  // Special-token trie: node -> sorted (byte, child); terminal special index or -1.
  struct Node {
    std::vector<std::pair<unsigned char, int>> next;
    int special = -1;
  };
  std::vector<Node> trie;
  bool first_byte[256] = {};
  bool any_nonspecial_added = false;

  // Filled up to 4/5 (cl100k: 100k pairs in 128k slots, 2 MiB; o200k 4 MiB). On cold text a merge's new
  // pairs miss the pair cache and come from this table, one dependent miss per merge: at load 1/2 it was
  // twice the size and cold passes ran 4-7% slower (C++ loop, cl100k code / prose / mixed, GPT-2 and o200k
  // code; Chinese level), although linear probing walks longer runs at 4/5.
  static bool pairs_over_load(size_t count, size_t slots) { return count * 5 > slots * 4; }
  void init_pairs(size_t expected) {
    size_t slots = next_pow2(expected + 1);
    if (pairs_over_load(expected, slots)) slots *= 2;
    pairs.assign(slots, PairSlot{kEmpty, 0, 0});
    pair_mask = pairs.size() - 1;
    pair_count = 0;
  }
  void put_pair(uint32_t l, uint32_t r, uint32_t rank, uint32_t merged) {
    if (pairs_over_load(pair_count + 1, pairs.size())) {
      Table<PairSlot> old;
      old.swap(pairs);
      pairs.assign(old.size() * 2, PairSlot{kEmpty, 0, 0});
      pair_mask = pairs.size() - 1;
      pair_count = 0;
      for (const auto& s : old)
        if (s.key != kEmpty) put_pair(static_cast<uint32_t>(s.key >> 32), static_cast<uint32_t>(s.key), s.rank, s.merged);
    }
    const uint64_t key = (static_cast<uint64_t>(l) << 32) | r;
    size_t i = mix(key) & pair_mask;
    while (pairs[i].key != kEmpty && pairs[i].key != key) i = (i + 1) & pair_mask;
    if (pairs[i].key == kEmpty) ++pair_count;
    pairs[i] = PairSlot{key, rank, merged};  // a repeated pair keeps the last entry, as HF's map does
  }
  // The pairs that merge, like tok_filter: most lookups that miss the per-thread pair cache ask about
  // pairs that do not merge (the boundaries of the final tokens), and a clear bit answers them without
  // the pair table's cache miss. 4 bits per pair (128 KiB for cl100k).
  BucketFilter<40> pair_filter;
  void build_pair_filter() {
    pair_filter.reset(pair_count, 4);
    for (const auto& slot : pairs)
      if (slot.key != kEmpty) pair_filter.add(mix(slot.key));
  }
  inline const PairSlot* probe_pair(uint64_t key, uint64_t h) const {
    size_t i = h & pair_mask;
    while (true) {
      const PairSlot& s = pairs[i];
      if (s.key == key) return &s;
      if (s.key == kEmpty) return nullptr;
      i = (i + 1) & pair_mask;
    }
  }
  // find_pair, or nullptr at once when the filter rules the pair out (only after build_pair_filter).
  inline const PairSlot* find_pair_filtered(uint32_t l, uint32_t r) const {
    const uint64_t key = (static_cast<uint64_t>(l) << 32) | r;
    const uint64_t h = mix(key);
    return pair_filter.may_contain(h) ? probe_pair(key, h) : nullptr;
  }
  inline const PairSlot* find_pair(uint32_t l, uint32_t r) const {
    const uint64_t key = (static_cast<uint64_t>(l) << 32) | r;
    return probe_pair(key, mix(key));
  }
  // The merge textbook BPE makes next in sym[0..m): the pair of lowest rank, the leftmost of equal ranks
  // (as tiktoken and HF), at *at; nullptr when no pair merges. For load-time analysis (no caches, no filter).
  const PairSlot* next_merge(const uint32_t* sym, size_t m, size_t* at) const {
    const PairSlot* best = nullptr;
    for (size_t k = 0; k + 1 < m; ++k) {
      const PairSlot* p = find_pair(sym[k], sym[k + 1]);
      if (p && (!best || p->rank < best->rank)) {
        best = p;
        *at = k;
      }
    }
    return best;
  }

  void build_tokens(const std::vector<std::string>& bytes, const std::vector<uint8_t>& kind) {
    id_bytes = &bytes;
    size_t n = 0;
    for (uint8_t k : kind) n += (k != 0);
    toks.assign(next_pow2(n * 2 + 1), TokSlot{0, kNoRank, 0, {}});
    tok_mask = toks.size() - 1;
    for (uint32_t id = 0; id < bytes.size(); ++id) {
      if (!kind[id]) continue;
      const std::string& b = bytes[id];
      const uint64_t h = hash_bytes(reinterpret_cast<const unsigned char*>(b.data()), b.size());
      size_t i = h & tok_mask;
      bool dup = false;
      while (toks[i].id != kNoRank) {
        if (toks[i].hash == h && bytes[toks[i].id] == b) {
          dup = true;  // first id wins (regular tokens are added before added tokens)
          break;
        }
        i = (i + 1) & tok_mask;
      }
      if (!dup) {
        toks[i] = TokSlot{h, id, static_cast<uint32_t>(b.size()), {}};
        std::memcpy(toks[i].bytes, b.data(), std::min(b.size(), kInline));
      }
    }
  }
  // The tokens that a whole-piece lookup may answer with (see Encoder::finish): a clear bit proves the
  // piece is no such token, without the token table's cache miss (pieces that need BPE, most of all the
  // long CJK runs no cache holds, are mostly not tokens). 8+ bits per token (128 KiB for cl100k) keep it
  // in L2 and false positives near 1 in 10.
  BucketFilter<36> tok_filter;
  void build_filter(bool all, const std::vector<uint8_t>& self) {
    size_t n = 0;
    for (const auto& slot : toks) n += slot.id != kNoRank;
    tok_filter.reset(n, 8);
    for (const auto& slot : toks)
      if (slot.id != kNoRank && (all || (slot.id < self.size() && self[slot.id]))) tok_filter.add(slot.hash);
  }
  inline bool may_be_token(uint64_t h) const { return tok_filter.may_contain(h); }
  inline int64_t find_token(const unsigned char* p, size_t n) const { return find_token(p, n, hash_bytes(p, n)); }
  inline void prefetch_token(uint64_t h) const { __builtin_prefetch(&toks[h & tok_mask]); }
  inline void prefetch_filter(uint64_t h) const { tok_filter.prefetch(h); }
  inline int64_t find_token(const unsigned char* p, size_t n, uint64_t h) const {
    size_t i = h & tok_mask;
    while (true) {
      const TokSlot& s = toks[i];
      if (s.id == kNoRank) return -1;
      if (s.hash == h && s.len == n &&
          std::memcmp(n <= kInline ? s.bytes : reinterpret_cast<const unsigned char*>((*id_bytes)[s.id].data()), p, n) == 0)
        return s.id;
      i = (i + 1) & tok_mask;
    }
  }
};

namespace {
std::atomic<uint32_t> g_next_uid{1};
}  // namespace

Encoder::Encoder() : t_(new Tables), uid_(g_next_uid.fetch_add(1)) {
  std::fill(std::begin(byte_id_), std::end(byte_id_), 0u);
  std::fill(std::begin(byte_present_), std::end(byte_present_), false);
}
Encoder::~Encoder() = default;

void Encoder::add_token(uint32_t id, std::string bytes, uint8_t kind) {
  // Ids index a dense table, so a corrupt file with id 2e9 would ask for tens of GB. Real vocabularies
  // have small gaps at most (cl100k's specials); allow 1M ids of slack beyond the entry count.
  if (id >= id_limit_)
    throw FormatError("token id " + std::to_string(id) + " is implausibly large for a vocabulary of " +
                      std::to_string(id_limit_ - kIdSlack) + " entries");
  if (id >= id_bytes_.size()) {
    id_bytes_.resize(static_cast<size_t>(id) + 1);
    id_kind_.resize(static_cast<size_t>(id) + 1, 0);
  }
  if (id_kind_[id] == 1 && kind == 1 && id_bytes_[id] != bytes)
    throw FormatError("token id " + std::to_string(id) + " is assigned twice");
  if (kind == 1 && bytes.size() == 1) {
    const unsigned char b = static_cast<unsigned char>(bytes[0]);
    if (!byte_present_[b]) {
      byte_present_[b] = true;
      byte_id_[b] = id;
    }
  }
  // An added token that is also a model token (BpeTrainer puts specials in both) stays decodable as
  // its content; both agree since the content is the token's bytes.
  if (id_kind_[id] == 0 || kind == 2) {
    id_bytes_[id] = std::move(bytes);
    id_kind_[id] = std::max<uint8_t>(id_kind_[id], kind);
  }
}

void Encoder::add_merge(uint32_t left, uint32_t right, uint32_t rank, uint32_t merged) {
  if (rank >= kMaxRank)
    throw FormatError("merge rank " + std::to_string(rank) + " is too large (ranks up to " +
                      std::to_string(kMaxRank - 1) + " are supported)");
  t_->put_pair(left, right, rank, merged);
  ++num_merges_;
}

// Every split of a token into two tokens decides like tiktoken, but a token t only ever forms from one of
// them: until t forms, the symbols inside its span evolve exactly as in BPE of t's bytes alone (a merge
// across the span's edge would stop t forming there, and ties go leftmost in both), so the last merge of
// that BPE is the one pair that can make t. The other splits are never adjacent as two whole symbols
// (if they were, the span would be in a state its own BPE passes through, which ends in that last merge),
// so dropping them changes no ids, and keeping a split of a token that never forms is harmless for the
// same reason. Tokens with one split keep it; those with several (`several`) keep the last merge of their
// own BPE, or none when it does not end in the token. Less than half the pairs remain (cl100k 233k ->
// 100k, o200k 446k -> 200k): the pair table is half the size (4 / 8 MiB less per encoder), and
// build_char_tokens sees fewer edge merges.
void Encoder::keep_last_merges(const std::vector<uint8_t>& several) {
  const Tables& t = *t_;
  std::vector<std::array<uint32_t, 3>> keep;  // left, right, token
  keep.reserve(id_bytes_.size());
  for (const auto& slot : t.pairs)
    if (slot.key != Tables::kEmpty && !several[slot.merged])
      keep.push_back({static_cast<uint32_t>(slot.key >> 32), static_cast<uint32_t>(slot.key), slot.merged});
  std::vector<uint32_t> sym;
  for (uint32_t id = 0; id < id_bytes_.size(); ++id) {
    if (!several[id]) continue;
    sym.clear();
    for (unsigned char b : id_bytes_[id]) sym.push_back(byte_id_[b]);
    uint32_t last_l = kNoRank, last_r = kNoRank;
    size_t bi = 0;
    while (const Tables::PairSlot* p = t.next_merge(sym.data(), sym.size(), &bi)) {
      last_l = sym[bi];
      last_r = sym[bi + 1];
      sym[bi] = p->merged;
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(bi) + 1);
    }
    if (sym.size() == 1 && sym[0] == id && last_l != kNoRank) keep.push_back({last_l, last_r, id});
  }
  t_->init_pairs(keep.size());
  num_merges_ = 0;
  for (const auto& k : keep) add_merge(k[0], k[1], k[2], k[2]);
}

void Encoder::finish(const std::vector<SpecialToken>& specials) {
  t_->build_pair_filter();  // every merge is in by now; BPE (below, for self_encoding_) reads the filter
  specials_ = specials;
  for (const auto& sp : specials_) {
    if (sp.text.empty()) throw FormatError("empty special token");
    add_token(sp.id, sp.text, 2);
  }
  t_->build_tokens(id_bytes_, id_kind_);
  t_->trie.assign(1, Tables::Node{});
  for (size_t k = 0; k < specials_.size(); ++k) {
    const std::string& s = specials_[k].text;
    if (!specials_[k].special) t_->any_nonspecial_added = true;
    t_->first_byte[static_cast<unsigned char>(s[0])] = true;
    int node = 0;
    for (unsigned char c : s) {
      auto& nx = t_->trie[node].next;
      auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, -1));
      if (it != nx.end() && it->first == c) {
        node = it->second;
      } else {
        int child = static_cast<int>(t_->trie.size());
        nx.insert(it, std::make_pair(c, child));
        t_->trie.emplace_back();
        node = child;
      }
    }
    if (t_->trie[node].special < 0) t_->trie[node].special = static_cast<int>(k);
  }
  byte_pairs_.assign(size_t{1} << 16, static_cast<uint64_t>(kNoRank) << 32);
  for (int a = 0; a < 256; ++a) {
    if (!byte_present_[a]) continue;
    for (int b = 0; b < 256; ++b) {
      if (!byte_present_[b]) continue;
      if (const Tables::PairSlot* p = t_->find_pair(byte_id_[a], byte_id_[b]))
        byte_pairs_[(a << 8) | b] = (static_cast<uint64_t>(p->rank) << 32) | p->merged;
    }
  }
  build_char_tokens();
  if (!whole_piece_lookup_) {
    // Which tokens BPE turns back into themselves: for those, a piece with the token's bytes can be
    // answered by one lookup in the token table, with the very ids the merges would give (a token that
    // BPE cannot reach from its own bytes, as HF-trained vocabularies have, keeps the full BPE).
    std::vector<uint8_t> self(id_bytes_.size(), 0);
    std::vector<uint32_t> ids;
    for (uint32_t id = 0; id < id_bytes_.size(); ++id) {
      if (id_kind_[id] != 1 || id_bytes_[id].size() < 2) continue;
      ids.clear();
      bpe_hashed(reinterpret_cast<const unsigned char*>(id_bytes_[id].data()), id_bytes_[id].size(), 0, ids);
      self[id] = ids.size() == 1 && ids[0] == id;
    }
    self_encoding_ = std::move(self);
  }
  t_->build_filter(whole_piece_lookup_, self_encoding_);
}

// BPE of text in a script of multi-byte characters spends most of its merges putting each character's
// bytes back together (o200k: most CJK characters are one token). A character c may start BPE as the
// tokens its bytes end as when merged alone, one token T or two tokens A B, instead of its bytes, when
// every merge that could join a symbol at c's edge with its neighbour (a symbol holding c's first byte
// with the one on its left, one holding its last byte with the one on its right, the final tokens
// included) has a higher rank than every merge inside c. Then, in any text, while c is incomplete some
// merge inside it outranks every merge across its edges, so nothing crosses them before c reaches its
// final tokens, the merges elsewhere are chosen as they would be with those tokens already there (each
// ranks at most that pending inner merge, below every merge with them), and c reaches them: BPE from
// them gives the same ids. (A B do not merge with each other: c's own BPE stopped there.) Ties count as
// unsafe. The neighbours matter only through the byte next to c, so the left edge is checked per last
// byte of the left neighbour (a merge (L, R) counts against the bytes L ends in; control bytes below
// 0x20 share one class) and against any neighbour, the right edge per lead byte the right neighbour
// starts with (lead_group) and against any neighbour; the encoder then uses c's tokens only where the
// text's bytes there allow it (or c is at the edge of the piece). Only 2- and 3-byte characters
// (U+0080-U+FFFF), from a table by code point (32 bytes each, 2 MiB), and only when all 256 bytes are
// tokens (no byte is dropped next to c).
void Encoder::build_char_tokens() {
  char_token_.clear();
  for (bool present : byte_present_)
    if (!present) return;
  const Tables& t = *t_;
  const size_t nid = id_bytes_.size();
  // The lowest rank of a merge with the id on its right (left neighbour: any) and on its left (right
  // neighbour: any / starting with a lead byte, by lead_group).
  std::vector<uint32_t> right_any(nid, kNoRank), left_any(nid, kNoRank);
  std::vector<uint32_t> left_lead(nid * kLeadGroups, kNoRank);
  // And by the left neighbour's last byte b < 0xC0, for the ids that can hold a character's first byte
  // (they start with a lead byte and are at most 3 bytes long): (id, b, rank) triples, grouped by id below.
  struct LeftMerge {
    uint32_t id, rank;
    uint8_t byte;
  };
  std::vector<LeftMerge> by_left_byte;
  for (const auto& slot : t.pairs) {
    if (slot.key == Tables::kEmpty) continue;
    const uint32_t l = static_cast<uint32_t>(slot.key >> 32), r = static_cast<uint32_t>(slot.key);
    if (l >= nid || r >= nid) continue;
    const std::string& lb = id_bytes_[l];
    const std::string& rb = id_bytes_[r];
    right_any[r] = std::min(right_any[r], slot.rank);
    left_any[l] = std::min(left_any[l], slot.rank);
    if (!lb.empty() && static_cast<unsigned char>(lb.back()) < 0xC0 && !rb.empty() && rb.size() <= 3 &&
        static_cast<unsigned char>(rb[0]) >= 0xC0)
      by_left_byte.push_back({r, slot.rank, static_cast<uint8_t>(lb.back())});
    if (!rb.empty() && static_cast<unsigned char>(rb[0]) >= 0xC0) {
      uint32_t& v = left_lead[l * kLeadGroups + lead_group(static_cast<unsigned char>(rb[0]))];
      v = std::min(v, slot.rank);
    }
  }
  std::sort(by_left_byte.begin(), by_left_byte.end(), [](const LeftMerge& a, const LeftMerge& b) { return a.id < b.id; });
  std::vector<uint32_t> first_left(nid + 1, 0);  // by_left_byte[first_left[id], first_left[id + 1]): id's
  for (const LeftMerge& lm : by_left_byte) ++first_left[lm.id + 1];
  for (size_t id = 0; id < nid; ++id) first_left[id + 1] += first_left[id];
  std::vector<CharToken> table(0x10000, CharToken{kNoRank, kNoRank, {0, 0, 0}});
  bool any = false;
  for (uint32_t cp = 0x80; cp < 0x10000; ++cp) {
    if (cp >= 0xD800 && cp < 0xE000) continue;  // surrogates are not characters
    unsigned char b[4];
    size_t m = encode_utf8(cp, b);  // 2 or 3 bytes
    uint32_t sym[3];
    for (size_t k = 0; k < m; ++k) sym[k] = byte_id_[b[k]];
    // BPE of c alone (lowest rank, leftmost first, as bpe_hashed), with the highest rank merged inside c
    // and, over every step, the lowest rank of a merge across each edge.
    uint32_t max_inside = 0;
    uint32_t l_any = right_any[sym[0]];
    uint32_t l_byte[0xC0];  // by the left neighbour's last byte
    std::fill(std::begin(l_byte), std::end(l_byte), kNoRank);
    auto fold_left = [&](uint32_t id) {
      for (uint32_t k = first_left[id]; k < first_left[id + 1]; ++k)
        l_byte[by_left_byte[k].byte] = std::min(l_byte[by_left_byte[k].byte], by_left_byte[k].rank);
    };
    fold_left(sym[0]);
    uint32_t r_any = left_any[sym[m - 1]];
    uint32_t r_lead[kLeadGroups];
    for (int g = 0; g < kLeadGroups; ++g) r_lead[g] = left_lead[sym[m - 1] * kLeadGroups + g];
    bool settled = true;  // its BPE stopped because no pair merges
    while (m > 1) {
      size_t bi = 0;
      const Tables::PairSlot* p = t.next_merge(sym, m, &bi);
      if (!p) break;
      if (p->merged >= nid) {
        settled = false;
        break;
      }
      max_inside = std::max(max_inside, p->rank);
      sym[bi] = p->merged;
      for (size_t k = bi + 1; k + 1 < m; ++k) sym[k] = sym[k + 1];
      --m;
      l_any = std::min(l_any, right_any[sym[0]]);
      fold_left(sym[0]);
      r_any = std::min(r_any, left_any[sym[m - 1]]);
      for (int g = 0; g < kLeadGroups; ++g) r_lead[g] = std::min(r_lead[g], left_lead[sym[m - 1] * kLeadGroups + g]);
    }
    if (m > 2 || !settled) continue;
    CharToken c{sym[0], m == 2 ? sym[1] : kNoRank, {0, 0, 0}};
    if (max_inside < l_any) c.after[0] |= kCharLeftAny;
    if (max_inside < r_any) c.after[0] |= kCharRightAny;
    for (int g = 0; g < kLeadGroups; ++g)
      if (max_inside < r_lead[g]) c.after[0] |= uint64_t{1} << (kCharLeadShift + g);
    const uint32_t control = *std::min_element(l_byte, l_byte + 0x20);  // bytes below 0x20: one class
    for (unsigned k = 0; k < 0xC0; ++k)
      if (max_inside < (k < 0x20 ? control : l_byte[k])) c.after[k >> 6] |= uint64_t{1} << char_after_bit(static_cast<unsigned char>(k));
    table[cp] = c;
    any = true;
  }
  if (any) char_token_ = std::move(table);
}

int64_t Encoder::token_id(std::string_view bytes) const {
  return t_->find_token(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
}

// ---------------------------------------------------------------------------------------------------
// Loading

namespace {

// GPT-2's byte <-> printable-character map used by byte-level tokenizer.json vocabularies.
struct ByteLevelMap {
  int byte_of[324];  // code point -> byte, -1 when not a byte-level char (all such chars are < 324)
  ByteLevelMap() {
    std::fill(std::begin(byte_of), std::end(byte_of), -1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      byte_of[printable ? b : 256 + extra++] = b;
    }
  }
  // Byte-level string -> raw bytes; false when some char is not byte-level.
  bool decode(const std::string& s, std::string& out) const {
    out.clear();
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    size_t i = 0;
    while (i < s.size()) {
      Decoded d = decode_utf8(p, s.size(), i);
      if (d.cp >= 324 || byte_of[d.cp] < 0) return false;
      out += static_cast<char>(byte_of[d.cp]);
      i += d.len;
    }
    return true;
  }
};

const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

uint32_t as_id(const json::Value& v, const char* what) {
  if (v.type != json::Value::kNumber || v.number < 0 || v.number > 0x7FFFFFFF || v.number != static_cast<uint32_t>(v.number))
    throw FormatError(std::string("tokenizer.json: ") + what + " is not a valid token id");
  return static_cast<uint32_t>(v.number);
}

bool truthy(const json::Value* v) { return v && v->type == json::Value::kBool && v->boolean; }
bool null_or_empty(const json::Value* v) {
  return !v || v->is_null() || (v->type == json::Value::kString && v->str.empty());
}

std::string type_of(const json::Value* v) {
  const json::Value* type = v ? v->get("type") : nullptr;
  return type && type->type == json::Value::kString ? type->str : "";
}

// The Split regexes of the byte-level tokenizer.json layouts we support, exactly as the files spell
// them, and the hand-written pattern that splits text as that regex does (tests check each against HF).
Pattern split_regex_pattern(const std::string& re) {
  static const std::pair<const char*, Pattern> kKnown[] = {
      // Llama-3 (and DeepSeek-R1-Distill-Llama, ...)
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
       Pattern::kLlama3},
      // Qwen2 / Qwen2.5 / Qwen3
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
       Pattern::kQwen2},
      // GPT-OSS (o200k_harmony) and other o200k exports
      {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
       Pattern::kO200k},
      // cl100k exports (tiktoken's pattern; Oniguruma needs the interval without the possessive +)
      {R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)",
       Pattern::kCl100k},
      {R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)",
       Pattern::kLlama3},  // tiktoken's older cl100k spelling, without \s++$: Llama-3's splits
      // GPT-2's ByteLevel regex written out as a Split
      {R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", Pattern::kGpt2},
  };
  for (const auto& k : kKnown)
    if (re == k.first) return k.second;
  throw FormatError("tokenizer.json: unsupported pre_tokenizer Split regex '" + re +
                    "' (supported: the GPT-2, cl100k, o200k/GPT-OSS, Llama-3 and Qwen2 regexes)");
}

void check_byte_level(const json::Value* pt, bool want_regex) {
  if (truthy(pt->get("add_prefix_space")))
    throw FormatError("tokenizer.json: ByteLevel add_prefix_space=true is not supported");
  const json::Value* use_regex = pt->get("use_regex");
  const bool regex = !(use_regex && use_regex->type == json::Value::kBool && !use_regex->boolean);
  if (regex != want_regex)
    throw FormatError(want_regex ? "tokenizer.json: a lone ByteLevel pre_tokenizer with use_regex=false is not supported"
                                 : "tokenizer.json: ByteLevel use_regex=true after a Split is not supported");
}

// An Isolated, non-inverted Split's regex, or "" for anything else.
std::string isolated_split_regex(const json::Value* split) {
  if (type_of(split) != "Split") return "";
  const json::Value* behavior = split->get("behavior");
  if (!behavior || behavior->type != json::Value::kString || behavior->str != "Isolated" || truthy(split->get("invert")))
    return "";
  const json::Value* pattern = split->get("pattern");
  const json::Value* regex = pattern ? pattern->get("Regex") : nullptr;
  return regex && regex->type == json::Value::kString ? regex->str : "";
}

// DeepSeek-V3's (and V3.1/R1's) Sequence: its three Isolated Splits, exactly as the file spells them, then
// ByteLevel.
bool is_deepseek_v3(const std::vector<const json::Value*>& items) {
  static const char* const kSplits[3] = {
      R"(\p{N}{1,3})",
      "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
  };
  if (items.size() != 4 || type_of(items[3]) != "ByteLevel") return false;
  for (int k = 0; k < 3; ++k)
    if (isolated_split_regex(items[k]) != kSplits[k]) return false;
  return true;
}

struct PreTokenizer {
  Pattern pattern;
  DigitSplit digits;
};

// The pre-tokenizer layouts of byte-level BPE files: ByteLevel (its own GPT-2 regex), or
// Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)], either one optionally preceded by
// Digits (Sequence[Digits, ByteLevel] / Sequence[Digits, Split, ByteLevel(use_regex=false)]). Anything
// else is refused by name.
PreTokenizer pre_tokenizer_layout(const json::Value* pt) {
  if (!pt || pt->is_null())
    throw FormatError("tokenizer.json: no pre_tokenizer; only byte-level BPE (ByteLevel pre-tokenizer) is supported");
  const std::string t = type_of(pt);
  if (t == "ByteLevel") {
    check_byte_level(pt, true);
    return {Pattern::kGpt2, DigitSplit::kNone};
  }
  if (t == "Sequence") {
    const json::Value* list = pt->get("pretokenizers");
    if (!list || list->type != json::Value::kArray) throw FormatError("tokenizer.json: pre_tokenizer Sequence without a list");
    for (const auto& item : list->items) {
      const std::string it = type_of(&item);
      if (it != "Split" && it != "ByteLevel" && it != "Digits")
        throw FormatError("tokenizer.json: unsupported pre_tokenizer '" + it + "' in Sequence");
    }
    std::vector<const json::Value*> items;
    for (const auto& item : list->items) items.push_back(&item);
    DigitSplit digits = DigitSplit::kNone;
    if (!items.empty() && type_of(items[0]) == "Digits") {
      const json::Value* each = items[0]->get("individual_digits");
      digits = truthy(each) ? DigitSplit::kEach : DigitSplit::kRuns;
      items.erase(items.begin());
    }
    for (const json::Value* item : items)
      if (type_of(item) == "Digits")
        throw FormatError("tokenizer.json: unsupported pre_tokenizer Sequence layout (Digits only as its first step)");
    if (digits == DigitSplit::kNone && is_deepseek_v3(items)) {
      check_byte_level(items[3], false);
      return {Pattern::kDeepSeekV3, DigitSplit::kNone};
    }
    if (items.size() == 1 && type_of(items[0]) == "ByteLevel") {
      check_byte_level(items[0], true);
      return {Pattern::kGpt2, digits};
    }
    if (items.size() == 2 && type_of(items[0]) == "Split" && type_of(items[1]) == "ByteLevel") {
      const json::Value& split = *items[0];
      const json::Value* behavior = split.get("behavior");
      if (!behavior || behavior->type != json::Value::kString || behavior->str != "Isolated")
        throw FormatError("tokenizer.json: unsupported Split behavior '" +
                          (behavior && behavior->type == json::Value::kString ? behavior->str : std::string("?")) +
                          "' (only Isolated)");
      if (truthy(split.get("invert"))) throw FormatError("tokenizer.json: unsupported Split invert=true");
      const json::Value* pattern = split.get("pattern");
      const json::Value* regex = pattern ? pattern->get("Regex") : nullptr;
      if (!regex || regex->type != json::Value::kString)
        throw FormatError("tokenizer.json: unsupported Split pattern (only a Regex pattern is supported)");
      check_byte_level(items[1], false);
      return {split_regex_pattern(regex->str), digits};
    }
    throw FormatError("tokenizer.json: unsupported pre_tokenizer Sequence layout (supported: [ByteLevel], "
                      "[Split, ByteLevel(use_regex=false)], each optionally after Digits)");
  }
  throw FormatError("tokenizer.json: unsupported pre_tokenizer '" + t + "'");
}

// The normalizer: none, NFC (Qwen2/3) or NFKC, which the Python layer applies; others are refused by name.
std::string normalizer_name(const json::Value* nz) {
  if (!nz || nz->is_null()) return "";
  const std::string t = type_of(nz);
  if (t == "NFC" || t == "NFKC") return t;
  if (t == "Sequence") {
    const json::Value* list = nz->get("normalizers");
    if (list && list->type == json::Value::kArray && list->items.empty()) return "";
    if (list && list->type == json::Value::kArray && list->items.size() == 1) return normalizer_name(&list->items[0]);
    throw FormatError("tokenizer.json: unsupported normalizer Sequence (only empty or a single NFC / NFKC)");
  }
  throw FormatError("tokenizer.json: unsupported normalizer '" + t + "'");
}

int b64val(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool base64_decode(std::string_view in, std::string& out) {
  out.clear();
  if (in.size() % 4 != 0 || in.empty()) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      unsigned char c = static_cast<unsigned char>(in[i + k]);
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
      } else {
        if (pad) return false;
        v[k] = b64val(c);
        if (v[k] < 0) return false;
      }
    }
    uint32_t w = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out += static_cast<char>(w >> 16);
    if (pad < 2) out += static_cast<char>((w >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(w & 0xFF);
  }
  return true;
}

}  // namespace

std::unique_ptr<Encoder> Encoder::from_hf_json(std::string_view text) {
  json::Value doc = json::parse(text);
  if (doc.type != json::Value::kObject) throw FormatError("tokenizer.json: top level is not an object");
  const json::Value* model = doc.get("model");
  if (!model || model->type != json::Value::kObject) throw FormatError("tokenizer.json: no model");
  const json::Value* mtype = model->get("type");
  if (mtype && !(mtype->type == json::Value::kString && mtype->str == "BPE"))
    throw FormatError("tokenizer.json: model type is not BPE");
  if (truthy(model->get("byte_fallback"))) throw FormatError("tokenizer.json: byte_fallback BPE is not supported");
  const json::Value* dropout = model->get("dropout");
  if (dropout && !dropout->is_null()) throw FormatError("tokenizer.json: BPE dropout is not supported");
  if (!null_or_empty(model->get("continuing_subword_prefix")) || !null_or_empty(model->get("end_of_word_suffix")))
    throw FormatError("tokenizer.json: continuing_subword_prefix / end_of_word_suffix are not supported");
  const std::string normalizer = normalizer_name(doc.get("normalizer"));
  const PreTokenizer pre = pre_tokenizer_layout(doc.get("pre_tokenizer"));

  const json::Value* vocab = model->get("vocab");
  const json::Value* merges = model->get("merges");
  if (!vocab || vocab->type != json::Value::kObject) throw FormatError("tokenizer.json: model.vocab is not an object");
  if (!merges || merges->type != json::Value::kArray) throw FormatError("tokenizer.json: model.merges is not a list");

  std::unique_ptr<Encoder> enc(new Encoder);
  enc->pattern_ = pre.pattern;
  enc->digits_ = pre.digits;
  enc->normalizer_ = normalizer;
  enc->whole_piece_lookup_ = truthy(model->get("ignore_merges"));
  const json::Value* added_list = doc.get("added_tokens");
  enc->id_limit_ = vocab->members.size() + (added_list ? added_list->items.size() : 0) + kIdSlack;

  // Added tokens first: their vocab entries need not be byte-level strings.
  std::vector<SpecialToken> specials;
  std::unordered_map<std::string, uint32_t> added_content;
  if (const json::Value* added = doc.get("added_tokens"); added && added->type == json::Value::kArray) {
    for (const auto& a : added->items) {
      const json::Value* id = a.get("id");
      const json::Value* content = a.get("content");
      if (!id || !content || content->type != json::Value::kString)
        throw FormatError("tokenizer.json: added token without id/content");
      if (truthy(a.get("lstrip")) || truthy(a.get("rstrip")) || truthy(a.get("single_word")))
        throw FormatError("tokenizer.json: added token '" + content->str + "' uses lstrip/rstrip/single_word (unsupported)");
      const bool special = truthy(a.get("special"));
      const json::Value* normalized = a.get("normalized");
      const bool norm = normalized && normalized->type == json::Value::kBool ? normalized->boolean : !special;
      specials.push_back(SpecialToken{content->str, as_id(*id, "added token id"), special, norm});
      added_content.emplace(content->str, specials.back().id);
    }
  }

  const ByteLevelMap& bl = byte_level();
  std::unordered_map<std::string, uint32_t> str_to_id;
  str_to_id.reserve(vocab->members.size() * 2);
  std::string raw;
  for (const auto& m : vocab->members) {
    uint32_t id = as_id(m.second, "vocab entry");
    str_to_id[m.first] = id;
    if (bl.decode(m.first, raw)) {
      enc->add_token(id, raw, 1);
    } else if (!added_content.count(m.first)) {
      throw FormatError("tokenizer.json: vocab entry is not a byte-level token: " + m.first);
    }
  }

  enc->t_->init_pairs(merges->items.size());
  uint32_t rank = 0;
  for (const auto& mv : merges->items) {
    std::string a, b;
    if (mv.type == json::Value::kString) {
      size_t sp = mv.str.find(' ');
      if (sp == std::string::npos || mv.str.find(' ', sp + 1) != std::string::npos)
        throw FormatError("tokenizer.json: bad merge '" + mv.str + "'");
      a = mv.str.substr(0, sp);
      b = mv.str.substr(sp + 1);
    } else if (mv.type == json::Value::kArray && mv.items.size() == 2 && mv.items[0].type == json::Value::kString &&
               mv.items[1].type == json::Value::kString) {
      a = mv.items[0].str;
      b = mv.items[1].str;
    } else {
      throw FormatError("tokenizer.json: bad merge entry");
    }
    auto ia = str_to_id.find(a), ib = str_to_id.find(b), im = str_to_id.find(a + b);
    if (ia == str_to_id.end() || ib == str_to_id.end() || im == str_to_id.end())
      throw FormatError("tokenizer.json: merge '" + a + " " + b + "' refers to tokens missing from the vocab");
    enc->add_merge(ia->second, ib->second, rank++, im->second);
  }
  enc->finish(specials);
  return enc;
}

std::unique_ptr<Encoder> Encoder::from_tiktoken(std::string_view contents, Pattern pattern,
                                                const std::vector<std::pair<std::string, uint32_t>>& specials) {
  std::unique_ptr<Encoder> enc(new Encoder);
  enc->pattern_ = pattern;
  enc->whole_piece_lookup_ = true;  // tiktoken returns a piece's own rank before running BPE
  enc->id_limit_ = static_cast<size_t>(std::count(contents.begin(), contents.end(), '\n')) + 1 + specials.size() + kIdSlack;
  std::string raw;
  size_t pos = 0, line_no = 0;
  while (pos < contents.size()) {
    size_t eol = contents.find('\n', pos);
    if (eol == std::string_view::npos) eol = contents.size();
    std::string_view line = contents.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    auto bad = [&]() { return FormatError(".tiktoken line " + std::to_string(line_no) + " is not '<base64> <rank>'"); };
    if (sp == std::string_view::npos || sp + 1 >= line.size()) throw bad();
    if (!base64_decode(line.substr(0, sp), raw)) throw bad();
    uint64_t rank = 0;
    for (char c : line.substr(sp + 1)) {
      if (c < '0' || c > '9' || rank > 0x7FFFFFFF) throw bad();
      rank = rank * 10 + (c - '0');
    }
    if (rank > 0x7FFFFFFF) throw bad();
    if (static_cast<uint32_t>(rank) < enc->id_kind_.size() && enc->id_kind_[rank])
      throw FormatError(".tiktoken line " + std::to_string(line_no) + ": rank " + std::to_string(rank) + " repeated");
    enc->add_token(static_cast<uint32_t>(rank), raw, 1);
  }
  if (enc->id_bytes_.empty()) throw FormatError(".tiktoken file has no tokens");
  for (int b = 0; b < 256; ++b)
    if (!enc->byte_present_[b]) throw FormatError(".tiktoken vocabulary lacks the single byte " + std::to_string(b));
  // tiktoken merges two adjacent parts when their concatenation is a token, by that token's rank.
  // Every split of a token into two tokens is such a pair, so listing them all gives an id-pair table
  // that decides exactly like tiktoken's byte-string lookups; keep_last_merges then keeps one per token.
  enc->t_->build_tokens(enc->id_bytes_, enc->id_kind_);
  enc->t_->init_pairs(enc->id_bytes_.size());  // grows as splits are added
  std::vector<uint8_t> several(enc->id_bytes_.size(), 0);
  for (uint32_t id = 0; id < enc->id_bytes_.size(); ++id) {
    if (enc->id_kind_[id] != 1) continue;
    const std::string& b = enc->id_bytes_[id];
    const auto* p = reinterpret_cast<const unsigned char*>(b.data());
    int splits = 0;
    for (size_t k = 1; k < b.size(); ++k) {
      int64_t l = enc->t_->find_token(p, k);
      if (l < 0) continue;
      int64_t r = enc->t_->find_token(p + k, b.size() - k);
      if (r < 0) continue;
      enc->add_merge(static_cast<uint32_t>(l), static_cast<uint32_t>(r), id, id);
      ++splits;
    }
    several[id] = splits > 1;
  }
  enc->keep_last_merges(several);
  std::vector<SpecialToken> sp;
  for (const auto& s : specials) {
    if (s.second < enc->id_kind_.size() && enc->id_kind_[s.second] == 1)
      throw FormatError("special token " + s.first + " reuses the id of a regular token: " + std::to_string(s.second));
    sp.push_back(SpecialToken{s.first, s.second, true, false});
  }
  enc->finish(sp);
  return enc;
}

std::unique_ptr<Encoder> Encoder::from_vocab_and_merges(const std::vector<std::string>& vocab,
                                                        const std::vector<std::pair<uint32_t, uint32_t>>& merges,
                                                        Pattern pattern, bool whole_piece_lookup,
                                                        const std::vector<SpecialToken>& specials) {
  std::unique_ptr<Encoder> enc(new Encoder);
  enc->pattern_ = pattern;
  enc->whole_piece_lookup_ = whole_piece_lookup;
  enc->id_limit_ = vocab.size() + specials.size() + kIdSlack;
  for (uint32_t id = 0; id < vocab.size(); ++id) enc->add_token(id, vocab[id], 1);
  enc->t_->build_tokens(enc->id_bytes_, enc->id_kind_);
  enc->t_->init_pairs(merges.size());
  uint32_t rank = 0;
  for (const auto& m : merges) {
    if (m.first >= vocab.size() || m.second >= vocab.size()) throw FormatError("merge refers to an unknown id");
    const std::string joined = vocab[m.first] + vocab[m.second];
    int64_t merged = enc->t_->find_token(reinterpret_cast<const unsigned char*>(joined.data()), joined.size());
    if (merged < 0) throw FormatError("merge result is not in the vocabulary");
    enc->add_merge(m.first, m.second, rank++, static_cast<uint32_t>(merged));
  }
  enc->finish(specials);
  return enc;
}

// ---------------------------------------------------------------------------------------------------
// Encoding

namespace {

// Per-thread cache of recent pieces -> ids. Text is Zipfian: a few thousand pieces (" the", "\n    ",
// "的") make up most of it, and hitting this small table avoids both the BPE and the cache misses of
// the vocabulary-sized hash tables. Entries carry the encoder's uid, so encoders never see each
// other's entries and nothing needs clearing. One entry is one 64-byte cache line: pieces up to 24
// bytes with up to 6 ids (nearly all pieces of real text); longer ones go straight to the tables.
struct PieceCache {
  static constexpr size_t kEntries = 65536;  // 4 MiB: holds the distinct pieces of megabytes of text
  static constexpr size_t kMaxBytes = 24;
  static constexpr size_t kMaxIds = 6;
  struct alignas(64) Entry {
    uint64_t hash;
    uint32_t owner;  // 0: empty
    uint8_t len;
    uint8_t nids;
    uint8_t pad[2];
    unsigned char bytes[kMaxBytes];
    // nids <= kMaxIds: the ids; more (up to kMaxBytes): ids[0..1] hold the 64-bit position of the ids
    // in the spill ring below.
    uint32_t ids[kMaxIds];
  };
  static_assert(sizeof(Entry) == 64, "one cache line per entry");
  Entry entries[kEntries];

  // The ids of cached pieces with more than kMaxIds of them: a ring of ids that the entries point into
  // by absolute position (spill_end counts every id ever written). An entry is valid while its ids have
  // not been overwritten, spill_end - pos <= kSpill; a piece's ids never wrap around the ring's end.
  // Code in GPT-2's vocabulary needs it: r50k has no tokens for runs of spaces, so an indented line's
  // "\n" + 8 spaces is 9 ids, and such pieces were BPE'd again at every occurrence.
  static constexpr size_t kSpill = 32768;  // 128 KiB
  uint64_t spill_end;
  uint32_t spill[kSpill + kMaxBytes];  // slack: readers copy kMaxBytes ids at once
  const uint32_t* spilled(const Entry& e) const {
    uint64_t pos;
    std::memcpy(&pos, e.ids, sizeof pos);
    return spill_end - pos <= kSpill ? spill + pos % kSpill : nullptr;
  }
  // Copies a cached piece's ids to dst (room for kMaxBytes ids) and returns how many there are, or
  // returns 0 when they were spilled and the ring has overwritten them since. A fixed number of ids is
  // copied whatever the count (a memcpy call costs more than the copy; the ring has slack for it).
  size_t copy_ids(const Entry& e, uint32_t* dst) const {
    const uint32_t* ids = e.nids <= kMaxIds ? e.ids : spilled(e);
    if (!ids) return 0;
    std::memcpy(dst, ids, kMaxIds * sizeof(uint32_t));
    if (e.nids > kMaxIds) std::memcpy(dst + kMaxIds, ids + kMaxIds, (kMaxBytes - kMaxIds) * sizeof(uint32_t));
    return e.nids;
  }
  void spill_into(Entry& e, const uint32_t* ids, size_t n) {
    if (spill_end % kSpill + n > kSpill) spill_end += kSpill - spill_end % kSpill;  // no wrap-around
    const uint64_t pos = spill_end;
    std::memcpy(spill + pos % kSpill, ids, n * sizeof(uint32_t));
    spill_end += n;
    std::memcpy(e.ids, &pos, sizeof pos);
  }

  // Recent merge-pair lookups, (left, right) -> (rank, merged), misses included. BPE of text in one
  // script meets the same pairs over and over ("的" is three bytes and two merges wherever it occurs);
  // this 128 KiB table answers them from L2 instead of the vocabulary-sized pair table. Cleared when
  // the thread switches to another encoder.
  static constexpr size_t kPairs = 8192;
  struct PairEntry {
    uint64_t key;  // left << 32 | right; ~0 when empty
    uint32_t rank;
    uint32_t merged;
  };
  uint32_t pair_owner;
  PairEntry pairs[kPairs];

  // The hot table: the most recent pieces of up to 16 bytes and one or two ids, direct-mapped, 512 KiB
  // (mostly L2-resident; 256 KiB and 1 MiB were both slower). The key is the piece's bytes zero-padded
  // to two words plus its length and the encoder's uid, so a match is exact with no hash or byte
  // compare beyond two words. Most pieces of prose and code (" the", "    ", "self") are found here
  // before the 4 MiB piece cache (L3) is touched at all.
  static constexpr int kHotBits = 14;
  static constexpr size_t kHot = size_t{1} << kHotBits;
  struct alignas(32) HotEntry {
    uint64_t w0, w1;
    uint64_t tag;  // uid << 32 | number of ids << 8 | length (| kHotRef); 0 when empty (uids start at 1)
    uint32_t ids[2];
  };
  static constexpr uint64_t kHotCountMask = uint64_t{0xFF} << 8;
  // Set in the length byte (so that the plain lookup misses): the piece has 3+ ids, and ids[0] is the
  // index of its PieceCache entry.
  static constexpr uint64_t kHotRef = 0x80;
  static_assert(sizeof(HotEntry) == 32, "two entries per cache line");
  HotEntry hot[kHot];

  // encode_span_t writes the ids of cached pieces here and appends them to the caller's vector in
  // bulk: a raw store per id instead of a push_back (a capacity check and a reload of the vector's end).
  static constexpr size_t kOut = 8192;
  uint32_t out[kOut];
};

PieceCache& thread_cache() {
  // Heap-allocated (a 4 MiB thread_local array would not fit the static TLS of a dlopen()ed module), in
  // fresh zero pages: a short-lived batch worker pays only for the entries it touches, not a memset.
  static thread_local ZeroedRegion region;
  if (!region.get()) region = ZeroedRegion(sizeof(PieceCache));
  return *static_cast<PieceCache*>(region.get());
}

inline uint32_t load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// a[0..n) == b[0..n) for 1 <= n <= 24 with a few overlapping word loads instead of a memcmp call.
SPARROW_INLINE bool same_short(const unsigned char* a, const unsigned char* b, size_t n) {
  if (n >= 8) {
    if (load64(a) != load64(b)) return false;
    if (n >= 16 && load64(a + 8) != load64(b + 8)) return false;
    return load64(a + n - 8) == load64(b + n - 8);
  }
  if (n >= 4) return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
  return a[0] == b[0] && a[n >> 1] == b[n >> 1] && a[n - 1] == b[n - 1];
}

// bpe_small's pair keys: kNoKey pads the scan and marks unlinked or last symbols; kEnd ends the list.
constexpr int32_t kNoKey = INT32_MAX;
constexpr uint8_t kEnd = 0xFF;

// pminsd, SSE4.1's 32-bit signed minimum, takes one instruction where SSE2 needs four (compare, and,
// andnot, or), and the merge loop's minimum is on the critical path of every merge (C++ loop, Chinese
// with a trained 16k vocabulary: +4-7% cold and warm). The build targets baseline x86-64 (SSE2), so the
// instruction is written as assembly and used where the CPU reports SSE4.1 (every x86-64 CPU since
// 2008-2011).
// SPARROW_BPE_SIMD=sse2 keeps the SSE2 sequence, so that tests can run both.
#if defined(__SSE2__) && !defined(__SSE4_1__) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SPARROW_BPE_PMINSD_AT_RUNTIME 1
const bool kHavePminsd = [] {
  __builtin_cpu_init();
  const char* force = std::getenv("SPARROW_BPE_SIMD");
  return __builtin_cpu_supports("sse4.1") && !(force && std::strcmp(force, "sse2") == 0);
}();
#endif

#if defined(__SSE2__)
// The smallest lane of v[0..groups), with `vmin` the lane-wise minimum of two vectors.
template <class VectorMin>
SPARROW_INLINE int32_t min_lane(const __m128i* v, size_t groups, VectorMin vmin) {
  __m128i b = _mm_load_si128(v);
  for (size_t i = 1; i < groups; ++i) b = vmin(b, _mm_load_si128(v + i));
  b = vmin(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
  b = vmin(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(b);
}
#endif

// The smallest of key[0..n), n a positive multiple of 4, key 16-byte aligned.
SPARROW_INLINE int32_t min_key(const int32_t* key, size_t n) {
#if defined(__SSE2__)
  const auto* v = reinterpret_cast<const __m128i*>(key);
#if defined(SPARROW_BPE_PMINSD_AT_RUNTIME)
  if (kHavePminsd) {
    return min_lane(v, n / 4, [](__m128i a, __m128i c) {
      asm("pminsd %1, %0" : "+x"(a) : "x"(c));
      return a;
    });
  }
#endif
  return min_lane(v, n / 4, [](__m128i a, __m128i c) {
#if defined(__SSE4_1__)
    return _mm_min_epi32(a, c);
#else
    const __m128i gt = _mm_cmpgt_epi32(a, c);
    return _mm_or_si128(_mm_and_si128(gt, c), _mm_andnot_si128(gt, a));
#endif
  });
#else
  int32_t best = kNoKey;
  for (size_t i = 0; i < n; ++i) best = key[i] < best ? key[i] : best;
  return best;
#endif
}

}  // namespace


void Encoder::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  bpe(reinterpret_cast<const unsigned char*>(piece.data()), piece.size(), out);
}

void Encoder::bpe(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const {
  if (n == 0) return;
  if (n == 1) {
    if (byte_present_[s[0]]) out.push_back(byte_id_[s[0]]);
    return;
  }
  bpe_hashed(s, n, (whole_piece_lookup_ || !self_encoding_.empty()) ? hash_bytes(s, n) : 0, out);
}

int64_t Encoder::whole_piece(const unsigned char* s, size_t n, uint64_t hash) const {
  if ((whole_piece_lookup_ || !self_encoding_.empty()) && t_->may_be_token(hash)) {
    int64_t id = t_->find_token(s, n, hash);
    // With whole-piece lookup (tiktoken) a token is its own encoding by definition; without it (HF)
    // only when BPE of its bytes gives back the token itself, which finish() worked out once per token.
    if (id >= 0 && (whole_piece_lookup_ || self_encoding_[static_cast<size_t>(id)])) return id;
  }
  return -1;
}

void Encoder::bpe_hashed(const unsigned char* s, size_t n, uint64_t hash, std::vector<uint32_t>& out) const {
  if (n <= kSmallPiece) {
    const size_t at = out.size();
    out.resize(at + n);
    out.resize(at + bpe_small(s, n, hash, out.data() + at));
    return;
  }
  const int64_t id = whole_piece(s, n, hash);
  if (id >= 0) {
    out.push_back(static_cast<uint32_t>(id));
    return;
  }
  bpe_large(s, n, out);
}

size_t Encoder::bpe_small(const unsigned char* s, size_t n, uint64_t hash, uint32_t* dst) const {
  const int64_t id = whole_piece(s, n, hash);
  if (id >= 0) {
    dst[0] = static_cast<uint32_t>(id);
    return 1;
  }
  // Quadratic scan over an array: for short pieces (nearly all of them) it beats any heap.
  constexpr size_t kSmall = kSmallPiece;
  uint32_t sym[kSmall];
  uint32_t merged[kSmall];  // merged[i]: the token the pair at i makes
  size_t m = 0;
  // raw[k]: the byte of a one-byte symbol, kCharSym for a character's token (see build_char_tokens).
  constexpr uint16_t kCharSym = 0x100;
  uint16_t raw[kSmall];
  const CharToken* chars = char_token_.empty() ? nullptr : char_token_.data();
  for (size_t i = 0; i < n;) {
    const unsigned char b = s[i];
    if (b >= 0xC2 && b < 0xF0 && chars) {
      uint32_t cp = kNoRank;
      size_t len = 0;
      if (b < 0xE0) {
        if (i + 1 < n && (s[i + 1] & 0xC0) == 0x80) {
          cp = ((b & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
          len = 2;
        }
      } else if (i + 2 < n && (s[i + 1] & 0xC0) == 0x80 && (s[i + 2] & 0xC0) == 0x80) {
        cp = ((b & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
        len = 3;
        if (cp < 0x800) cp = kNoRank;  // overlong
      }
      if (cp != kNoRank && chars[cp].first != kNoRank) {
        const CharToken& c = chars[cp];
        const uint64_t flags = c.after[0];
        const size_t j = i + len;
        const unsigned char before = i == 0 ? 0 : s[i - 1];
        if ((i == 0 || (before < 0xC0 ? (c.after[before >> 6] >> char_after_bit(before)) & 1 : flags & kCharLeftAny)) &&
            (j == n || (flags & kCharRightAny) || (s[j] >= 0xC0 && ((flags >> (kCharLeadShift + lead_group(s[j]))) & 1)))) {
          raw[m] = kCharSym;
          sym[m++] = c.first;
          if (c.second != kNoRank) {
            raw[m] = kCharSym;
            sym[m++] = c.second;
          }
          i = j;
          continue;
        }
      }
    }
    if (byte_present_[b]) {  // HF drops bytes that have no token
      raw[m] = b;
      sym[m++] = byte_id_[b];
    }
    ++i;
  }
  const Tables& t = *t_;
  if (m == 0) return 0;
  PieceCache& cache = thread_cache();
  if (cache.pair_owner != uid_) {
    for (auto& pe : cache.pairs) pe.key = ~0ull;
    cache.pair_owner = uid_;
  }
  // Each pair is known by its left symbol's position, which never changes: a merge writes the merged
  // token over the left symbol and unlinks the right one, so nothing shifts. key[i] = rank << 7 | i for the
  // pair (sym[i], sym[next[i]]) (kNoKey when it does not merge, or i is unlinked or last), and one minimum
  // over the keys gives both the lowest rank and, among equal ranks, the leftmost pair (as tiktoken and
  // HF). A merge changes two keys; the minimum is a few vector compares (pieces are mostly under 32
  // symbols), with no position search and no shifting of arrays.
  static_assert(kSmall <= 0x7F, "positions are 7 bits in a key and must stay below kEnd");
  alignas(16) int32_t key[kSmall + 4];
  uint8_t next[kSmall], prev[kSmall];
  auto set_key = [&](size_t i, uint32_t r) {
    // Ranks stay below kMaxRank (add_merge), so min(r, kMaxRank) << 7 is kNoKey's range only for kNoRank.
    key[i] = static_cast<int32_t>(((r < kMaxRank ? r : kMaxRank) << 7) | static_cast<uint32_t>(i));
  };
  auto look = [&](size_t i, size_t j) {  // the pair of sym[i] and its right neighbour sym[j]
    const uint64_t k = (static_cast<uint64_t>(sym[i]) << 32) | sym[j];
    PieceCache::PairEntry& pe = cache.pairs[mix(k) & (PieceCache::kPairs - 1)];
    if (pe.key != k) {
      const Tables::PairSlot* p = t.find_pair_filtered(sym[i], sym[j]);
      pe.key = k;
      pe.rank = p ? p->rank : kNoRank;
      pe.merged = p ? p->merged : 0;
    }
    set_key(i, pe.rank);
    merged[i] = pe.merged;
  };
  // The first round pairs single bytes: a 64k-entry table in cache instead of the big pair table.
  for (size_t i = 0; i + 1 < m; ++i) {
    next[i] = static_cast<uint8_t>(i + 1);
    prev[i + 1] = static_cast<uint8_t>(i);
    if ((raw[i] | raw[i + 1]) & kCharSym) {
      look(i, i + 1);
      continue;
    }
    const uint64_t bp = byte_pairs_[(static_cast<size_t>(raw[i]) << 8) | raw[i + 1]];
    set_key(i, static_cast<uint32_t>(bp >> 32));
    merged[i] = static_cast<uint32_t>(bp);
  }
  next[m - 1] = kEnd;
  // Keys from the last symbol on are kNoKey; `last` (the last linked symbol) bounds the scan.
  for (size_t i = m - 1; i < ((m + 3) & ~size_t{3}); ++i) key[i] = kNoKey;
  size_t last = m - 1;
  while (last > 0) {
    const int32_t best = min_key(key, (last + 3) & ~size_t{3});
    if (best >= static_cast<int32_t>(kMaxRank << 7)) break;  // no pair merges
    const size_t i = static_cast<uint32_t>(best) & 0x7F;
    const size_t j = next[i];
    sym[i] = merged[i];
    key[j] = kNoKey;
    const size_t after = next[j];
    next[i] = static_cast<uint8_t>(after);
    if (after != kEnd) {
      prev[after] = static_cast<uint8_t>(i);
      look(i, after);
    } else {
      key[i] = kNoKey;
      last = i;
    }
    if (i > 0) look(prev[i], i);
  }
  size_t out_n = 0;
  for (size_t i = 0; i != kEnd; i = next[i]) dst[out_n++] = sym[i];
  return out_n;
}

// O(n log n) BPE for long pieces (a megabyte of one letter is a single piece): a heap of candidate
// pairs ordered by (rank, position) over a doubly linked list of symbols. Entries are validated when
// popped instead of being deleted when they go stale.
void Encoder::bpe_large(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const {
  // Positions are 32-bit to keep the heap small; a single 4 GiB piece is not a tokenization input.
  if (n >= 0xFFFFFFFFu) throw std::length_error("a pre-tokenized piece of 4 GiB or more cannot be encoded");
  std::vector<uint32_t> sym;
  sym.reserve(n);
  for (size_t i = 0; i < n; ++i)
    if (byte_present_[s[i]]) sym.push_back(byte_id_[s[i]]);
  const size_t m = sym.size();
  if (m == 0) return;
  constexpr uint32_t kNone = 0xFFFFFFFFu;
  std::vector<uint32_t> prev(m), next(m);
  std::vector<uint8_t> alive(m, 1);
  for (size_t i = 0; i < m; ++i) {
    prev[i] = i == 0 ? kNone : static_cast<uint32_t>(i - 1);
    next[i] = i + 1 == m ? kNone : static_cast<uint32_t>(i + 1);
  }
  struct Cand {
    uint32_t rank, pos, left, right, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  const Tables& t = *t_;
  auto push = [&](uint32_t i) {
    if (i == kNone || next[i] == kNone) return;
    const Tables::PairSlot* p = t.find_pair(sym[i], sym[next[i]]);
    if (p) heap.push(Cand{p->rank, i, sym[i], sym[next[i]], p->merged});
  };
  for (uint32_t i = 0; i + 1 < m; ++i) push(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    const uint32_t i = c.pos;
    if (!alive[i] || sym[i] != c.left || next[i] == kNone || sym[next[i]] != c.right) continue;
    const uint32_t j = next[i];
    sym[i] = c.merged;
    alive[j] = 0;
    next[i] = next[j];
    if (next[j] != kNone) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  for (uint32_t i = 0; i != kNone; i = next[i]) out.push_back(sym[i]);
}

namespace {

// The bytes of a piece of 1..16 bytes at s[i..i+len) zero-padded to two words (the hot table's key).
// Reads 16 bytes at once where the text has them, else copies.
struct HotKey {
  uint64_t w0, w1;
};
// hot_key's masks by length: the low len bytes of the two words.
struct HotMasks {
  uint64_t lo[17], hi[17];
};
constexpr HotMasks make_hot_masks() {
  HotMasks m{};
  for (size_t len = 0; len <= 16; ++len) {
    m.lo[len] = len >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * len)) - 1;
    m.hi[len] = len <= 8 ? 0 : len == 16 ? ~uint64_t{0} : (uint64_t{1} << (8 * (len - 8))) - 1;
  }
  return m;
}
constexpr HotMasks kHotMasks = make_hot_masks();
SPARROW_INLINE HotKey hot_key(const unsigned char* s, size_t n, size_t i, size_t len) {
  HotKey k;
  if (i + 16 <= n) {
    k.w0 = load64(s + i);
    k.w1 = load64(s + i + 8);
  } else {
    unsigned char buf[16] = {};
    std::memcpy(buf, s + i, len);
    k.w0 = load64(buf);
    k.w1 = load64(buf + 8);
  }
  // Masks from a table, without a branch on the length (pieces of under and over 8 bytes alternate
  // unpredictably).
  k.w0 &= kHotMasks.lo[len];
  k.w1 &= kHotMasks.hi[len];
  return k;
}
SPARROW_INLINE size_t hot_slot(const HotKey& k, size_t len) {
  const uint64_t h = (k.w0 ^ (k.w1 * 0x9E3779B97F4A7C15ull) ^ len) * 0xBF58476D1CE4E5B9ull;
  return static_cast<size_t>(h >> (64 - PieceCache::kHotBits));
}

}  // namespace

template <Pattern P>
void Encoder::encode_span_t(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const {
  if (n == 0) return;
  PieceCache& cache = thread_cache();
  const uint64_t hot_tag = static_cast<uint64_t>(uid_) << 32;
  const bool lookup = whole_piece_lookup_ || !self_encoding_.empty();
  auto cacheable = [](size_t len) { return len >= 2 && len <= PieceCache::kMaxBytes; };
  auto set_of = [&](uint64_t h) { return &cache.entries[(h >> 20) & (PieceCache::kEntries - 2)]; };
  // The ids of cached pieces go to cache.out first (see PieceCache::out); BPE appends to `out` itself,
  // after what is buffered.
  uint32_t* const buf = cache.out;
  size_t nbuf = 0;
  auto flush = [&] {
    out.insert(out.end(), buf, buf + nbuf);
    nbuf = 0;
  };
  // A piece found in the hot table (most pieces, once the text has been seen) goes straight to the
  // buffer. The first one that is not starts a queue: it and the pieces after it, up to kQueue of them,
  // are split off (each that missed the hot table hashed and its cache set prefetched) before any is
  // looked up. The piece cache (4 MiB) lives in L3, or DRAM when other processes crowd the L3; with a
  // queue in flight those misses overlap instead of adding up. (16 and 32 timed the same, cold and warm;
  // 16 runs fewer hot-table hits through the queue.)
  constexpr size_t kQueue = 16;
  size_t bounds[kQueue + 1];
  uint64_t hashes[kQueue];
  // Per queued piece: its number of ids when it was found in the hot table (hot_n, with the ids in
  // hot_ids), else 0 and its slot in the hot table (kNoHot when longer than 16 bytes), to fill once its
  // ids are known.
  constexpr uint32_t kNoHot = ~0u;
  uint32_t hot_ids[kQueue][2];
  uint8_t hot_n[kQueue];
  uint32_t hot_slots[kQueue];
  HotKey hot_keys[kQueue];
  size_t k = 0;  // queued pieces
  // Remembers a piece of up to 16 bytes with one or two ids in the hot table.
  // Pieces with more ids (`entry`: their piece-cache entry) are remembered by reference to that entry.
  auto remember = [&](size_t q, size_t len, const uint32_t* ids, size_t nids, const PieceCache::Entry* entry) {
    if (hot_slots[q] == kNoHot || nids == 0 || (nids > 2 && !entry)) return;
    PieceCache::HotEntry& he = cache.hot[hot_slots[q]];
    he.w0 = hot_keys[q].w0;
    he.w1 = hot_keys[q].w1;
    if (nids <= 2) {
      he.tag = hot_tag | (static_cast<uint64_t>(nids) << 8) | len;
      he.ids[0] = ids[0];
      he.ids[1] = nids == 2 ? ids[1] : 0;
    } else {
      he.tag = hot_tag | PieceCache::kHotRef | len;
      he.ids[0] = static_cast<uint32_t>(entry - cache.entries);
    }
  };
  auto resolve = [&] {
    for (size_t q = 0; q < k; ++q) {
      if (hot_n[q]) {
        // Both ids are copied; the count says how many of them stand.
        if (nbuf + 2 > PieceCache::kOut) flush();
        std::memcpy(buf + nbuf, hot_ids[q], sizeof hot_ids[q]);
        nbuf += hot_n[q];
        continue;
      }
      const unsigned char* p = s + bounds[q];
      const size_t len = bounds[q + 1] - bounds[q];
      // Room for the most any piece below writes: bpe_small's kSmallPiece (a cache hit: kMaxBytes).
      if (nbuf + kSmallPiece > PieceCache::kOut) flush();
      if (len == 1) {
        if (byte_present_[p[0]]) {
          buf[nbuf++] = byte_id_[p[0]];
          remember(q, 1, &byte_id_[p[0]], 1, nullptr);
        }
        continue;
      }
      if (!cacheable(len)) {
        if (len <= kSmallPiece) {
          nbuf += bpe_small(p, len, lookup ? hash_bytes(p, len) : 0, buf + nbuf);
        } else {
          flush();
          bpe(p, len, out);
        }
        continue;
      }
      const uint64_t ph = hashes[q];
      // Two-way set: the pair of entries at an even index; a new piece goes into way 0, pushing the
      // older one to way 1 (so a piece survives one conflicting newcomer).
      PieceCache::Entry* set = set_of(ph);
      const PieceCache::Entry* hit = nullptr;
      if (set[0].hash == ph && set[0].owner == uid_ && set[0].len == len && same_short(set[0].bytes, p, len)) {
        hit = &set[0];
      } else if (set[1].hash == ph && set[1].owner == uid_ && set[1].len == len && same_short(set[1].bytes, p, len)) {
        hit = &set[1];
      }
      if (hit) {
        if (const size_t nids = cache.copy_ids(*hit, buf + nbuf)) {
          remember(q, len, buf + nbuf, nids, hit);
          nbuf += nids;
          continue;
        }
      }
      // A miss, or a spilled piece whose ids the ring has overwritten (it goes to way 0 again).
      PieceCache::Entry& entry = set[0];
      if (entry.owner && hit != &set[0]) set[1] = entry;
      const uint32_t* ids = buf + nbuf;
      const size_t produced = bpe_small(p, len, ph, buf + nbuf);
      nbuf += produced;
      remember(q, len, ids, produced, &entry);
      // BPE gives at most one id per byte, so every cacheable piece fits (inline or spilled).
      entry.hash = ph;
      entry.owner = uid_;
      entry.len = static_cast<uint8_t>(len);
      entry.nids = static_cast<uint8_t>(produced);
      if (len <= 16) {
        std::memcpy(entry.bytes, &hot_keys[q], 16);  // the piece's bytes, zero-padded
      } else {
        std::memcpy(entry.bytes, p, len);
      }
      if (produced <= PieceCache::kMaxIds) {
        std::memcpy(entry.ids, ids, PieceCache::kMaxIds * sizeof(uint32_t));
      } else {
        cache.spill_into(entry, ids, produced);
      }
    }
    k = 0;
  };
  Splitter<P> split(s, n);
  size_t i = 0;
  while (i < n) {
    const size_t e = split.next(i);
    const size_t len = e - i;
    if (len <= 16) {
      const HotKey key = hot_key(s, n, i, len);
      const size_t slot = hot_slot(key, len);
      const PieceCache::HotEntry& he = cache.hot[slot];
      if (he.w0 == key.w0 && he.w1 == key.w1 && (he.tag & ~PieceCache::kHotCountMask) == (hot_tag | len)) {
        if (k == 0) {
          if (nbuf + 2 > PieceCache::kOut) flush();
          std::memcpy(buf + nbuf, he.ids, sizeof he.ids);
          nbuf += static_cast<uint8_t>(he.tag >> 8);
        } else {
          std::memcpy(hot_ids[k], he.ids, sizeof he.ids);
          hot_n[k] = static_cast<uint8_t>(he.tag >> 8);
          bounds[++k] = e;
          if (k == kQueue) resolve();
        }
        i = e;
        continue;
      }
      if (k == 0 && he.w0 == key.w0 && he.w1 == key.w1 && he.tag == (hot_tag | PieceCache::kHotRef | len)) {
        // A piece of 3+ ids: its ids from its piece-cache entry, if that still holds it (same owner,
        // length and zero-padded bytes) and they are still there; else the miss path below.
        const PieceCache::Entry& pe = cache.entries[he.ids[0]];
        if (pe.owner == uid_ && pe.len == len && load64(pe.bytes) == key.w0 && load64(pe.bytes + 8) == key.w1) {
          if (nbuf + PieceCache::kMaxBytes > PieceCache::kOut) flush();
          if (const size_t nids = cache.copy_ids(pe, buf + nbuf)) {
            nbuf += nids;
            i = e;
            continue;
          }
        }
      }
      hot_slots[k] = static_cast<uint32_t>(slot);
      hot_keys[k] = key;
    } else {
      hot_slots[k] = kNoHot;
    }
    hot_n[k] = 0;
    if (cacheable(len)) {
      const uint64_t h = hash_bytes(s + i, len);
      const PieceCache::Entry* set = set_of(h);
      __builtin_prefetch(set);
      __builtin_prefetch(set + 1);
      // Not in the hot table: on cold text the piece is likely new, and its token-filter word and
      // token-table slot are DRAM misses; fetch both now (no load here depends on them).
      if (lookup) {
        t_->prefetch_filter(h);
        t_->prefetch_token(h);
      }
      hashes[k] = h;
    }
    if (k == 0) bounds[0] = i;
    bounds[++k] = e;
    if (k == kQueue) resolve();
    i = e;
  }
  resolve();
  flush();
}

void Encoder::encode_span(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const {
  if (digits_ != DigitSplit::kNone) {
    // Digits first: numbers (each run, or each character) and the text between them are segments that
    // the split pattern then sees one at a time, as separate texts.
    size_t i = 0;
    while (i < n) {
      size_t j = i;
      bool digit = false;
      while (j < n) {
        const piece::Ch c = piece::at(s, n, j);
        const bool d = (c.f & kNumber) != 0;
        if (j > i && d != digit) break;
        digit = d;
        j += c.len;
        if (d && digits_ == DigitSplit::kEach) break;
      }
      encode_pattern(s + i, j - i, out);
      i = j;
    }
    return;
  }
  encode_pattern(s, n, out);
}

void Encoder::encode_pattern(const unsigned char* s, size_t n, std::vector<uint32_t>& out) const {
  with_pattern(pattern_, [&](auto pattern) { encode_span_t<decltype(pattern)::value>(s, n, out); });
}

std::pair<size_t, size_t> Encoder::find_special(std::string_view text, size_t from, const std::vector<char>& usable) const {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  const Tables& t = *t_;
  for (size_t i = from; i < n; ++i) {
    if (!t.first_byte[s[i]]) continue;
    int node = 0;
    int best = -1;
    for (size_t j = i; j < n; ++j) {
      const auto& nx = t.trie[node].next;
      auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(s[j], -1));
      if (it == nx.end() || it->first != s[j]) break;
      node = it->second;
      int k = t.trie[node].special;
      if (k >= 0 && usable[k]) best = k;
    }
    if (best >= 0) return {i, static_cast<size_t>(best)};
  }
  return {std::string_view::npos, 0};
}

void Encoder::encode(std::string_view text, const std::vector<char>& allowed, bool check_disallowed,
                     std::vector<uint32_t>& out) const {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  if (specials_.empty()) return encode_span(s, text.size(), out);
  if (allowed.size() != specials_.size()) throw std::invalid_argument("allowed mask has the wrong size");
  std::vector<char> usable(specials_.size());
  bool any_usable = false;
  std::vector<char> forbidden(specials_.size());
  bool any_forbidden = false;
  for (size_t k = 0; k < specials_.size(); ++k) {
    usable[k] = !specials_[k].special || allowed[k];
    forbidden[k] = check_disallowed && specials_[k].special && !allowed[k];
    any_usable |= static_cast<bool>(usable[k]);
    any_forbidden |= static_cast<bool>(forbidden[k]);
  }
  if (any_forbidden) {
    // Like tiktoken: a disallowed special anywhere in the text is an error, even inside another match.
    auto hit = find_special(text, 0, forbidden);
    if (hit.first != std::string_view::npos) throw DisallowedSpecialError(specials_[hit.second].text);
  }
  if (!any_usable) return encode_span(s, text.size(), out);
  std::vector<char> first(specials_.size()), second(specials_.size());
  bool any_first = false, any_second = false;
  for (size_t k = 0; k < specials_.size(); ++k) {
    first[k] = usable[k] && !specials_[k].normalized;
    second[k] = usable[k] && specials_[k].normalized;
    any_first |= static_cast<bool>(first[k]);
    any_second |= static_cast<bool>(second[k]);
  }
  if (!any_first) return encode_added(text, second, any_second, out);
  size_t pos = 0;
  while (pos < text.size()) {
    auto hit = find_special(text, pos, first);
    if (hit.first == std::string_view::npos) {
      encode_added(text.substr(pos), second, any_second, out);
      break;
    }
    encode_added(text.substr(pos, hit.first - pos), second, any_second, out);
    out.push_back(specials_[hit.second].id);
    pos = hit.first + specials_[hit.second].text.size();
  }
}

void Encoder::encode_added(std::string_view seg, const std::vector<char>& mask, bool any, std::vector<uint32_t>& out) const {
  const auto* s = reinterpret_cast<const unsigned char*>(seg.data());
  if (!any) return encode_span(s, seg.size(), out);
  size_t pos = 0;
  while (pos < seg.size()) {
    auto hit = find_special(seg, pos, mask);
    if (hit.first == std::string_view::npos) {
      encode_span(s + pos, seg.size() - pos, out);
      return;
    }
    encode_span(s + pos, hit.first - pos, out);
    out.push_back(specials_[hit.second].id);
    pos = hit.first + specials_[hit.second].text.size();
  }
}

void Encoder::encode_ordinary(std::string_view text, std::vector<uint32_t>& out) const {
  if (!t_->any_nonspecial_added) {
    encode_span(reinterpret_cast<const unsigned char*>(text.data()), text.size(), out);
    return;
  }
  std::vector<char> none(specials_.size(), 0);
  encode(text, none, false, out);
}

void Encoder::decode(const uint32_t* ids, size_t n, std::string& out) const {
  // Two passes: validate and size, then copy into one allocation (no regrowth, no per-token append).
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t id = ids[i];
    if (!has_id(id)) throw std::out_of_range("token id " + std::to_string(id) + " is not in the vocabulary");
    total += id_bytes_[id].size();
  }
  const size_t start = out.size();
  out.resize(start + total);
  char* dst = &out[start];
  for (size_t i = 0; i < n; ++i) {
    const std::string& b = id_bytes_[ids[i]];
    std::memcpy(dst, b.data(), b.size());
    dst += b.size();
  }
}

}  // namespace sparrow::bpe
