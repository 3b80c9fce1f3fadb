// A small JSON reader for tokenizer.json (no third-party dependency in the core).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sparrow::bpe::json {

struct Value {
  enum Type : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject } type = kNull;
  bool boolean = false;
  double number = 0;
  std::string str;                                  // kString
  std::vector<Value> items;                         // kArray
  std::vector<std::pair<std::string, Value>> members;  // kObject, in file order

  // Member lookup (nullptr when absent or when this is not an object).
  const Value* get(std::string_view key) const;
  bool is_null() const { return type == kNull; }
};

// Throws sparrow::bpe::FormatError with the byte offset on malformed input.
Value parse(std::string_view text);

}  // namespace sparrow::bpe::json
