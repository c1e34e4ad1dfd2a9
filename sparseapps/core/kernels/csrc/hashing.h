// Counter-based uniform numbers shared by the ops: value i of a seed is a fixed hash of (seed, i), so any subset of
// positions can be evaluated alone (tie noise of the active entries only, the scores of growth candidates in a
// fused pass). Two rounds of MurmurHash3's finalizer over a Weyl sequence: distinct i (below 2^32) give distinct
// 32-bit hashes; the top 24 bits make the float. Twin: reference.hashed_uniform_reference (bit for bit).
#pragma once

#include <cstdint>

namespace sparseapps {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

struct HashKey {
  uint32_t key0;
  uint32_t key1;
  explicit HashKey(int64_t seed)
      : key0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        key1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
  // The key of the 2^32 block that holds position i.
  uint32_t high(int64_t i) const {
    return key1 + static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32) * 0x85ebca6bu;
  }
};

// u(seed, i) in [0, 1) given the block key `key_high` of i.
inline float hashed_uniform_value(int64_t i, uint32_t key0, uint32_t key_high) {
  const uint32_t h = fmix32(static_cast<uint32_t>(i) * 0x9e3779b9u + key0);
  return static_cast<float>(fmix32(h ^ key_high) >> 8) * (1.0f / 16777216.0f);
}

}  // namespace sparseapps
