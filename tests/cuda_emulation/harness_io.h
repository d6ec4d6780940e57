// Raw fp32 arrays in and out of the emulation harnesses.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

inline std::vector<float> read_floats(FILE* f, size_t n) {
  std::vector<float> v(n);
  if (fread(v.data(), sizeof(float), n, f) != n) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
  return v;
}

inline void write_floats(FILE* f, const std::vector<float>& v) { fwrite(v.data(), sizeof(float), v.size(), f); }
