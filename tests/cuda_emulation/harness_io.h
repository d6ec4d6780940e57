// The emulation harnesses' data: fp32 arrays in and out of files, converted to and from the dtype the
// kernels run in: float, or c10::Half / c10::BFloat16, the very types the extension's AT_DISPATCH
// hands its kernels (header-only, so g++ builds them without linking torch).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

inline std::vector<float> read_floats(FILE* f, size_t n) {
  std::vector<float> v(n);
  if (fread(v.data(), sizeof(float), n, f) != n) {
    fprintf(stderr, "short input\n");
    exit(2);
  }
  return v;
}

template <typename scalar_t>
std::vector<scalar_t> read_as(FILE* f, size_t n) {
  const auto floats = read_floats(f, n);
  return std::vector<scalar_t>(floats.begin(), floats.end());
}

template <typename scalar_t>
void write_as_floats(FILE* f, const std::vector<scalar_t>& v) {
  std::vector<float> floats(v.size());
  for (size_t i = 0; i < v.size(); ++i) floats[i] = static_cast<float>(v[i]);
  fwrite(floats.data(), sizeof(float), floats.size(), f);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<scalar_t>{}) for DTYPE "fp32", "fp16" or "bf16"
template <typename Fn>
void dispatch_dtype(const char* dtype, Fn fn) {
  if (!strcmp(dtype, "fp32")) {
    fn(TypeTag<float>{});
  } else if (!strcmp(dtype, "fp16")) {
    fn(TypeTag<c10::Half>{});
  } else if (!strcmp(dtype, "bf16")) {
    fn(TypeTag<c10::BFloat16>{});
  } else {
    fprintf(stderr, "dtype %s: expected fp32, fp16 or bf16\n", dtype);
    exit(2);
  }
}

// How a harness lays out an input the kernels read by strides: token-major, or channel-major, each
// channel's values of all B N tokens together (a permuted tensor's layout, as autograd hands it): channel
// stride B N, token stride 1, no token's channels adjacent (the attention kernels' element-wise staging,
// PEG's one-channel conv).
struct Layout {
  bool channel_major;
  // a contiguous (batch, rows, cols) tensor's values in this layout, and that layout's strides (b, n, k)
  template <typename scalar_t>
  std::vector<scalar_t> arrange(const std::vector<scalar_t>& values, long batch, long rows, long cols) const {
    if (!channel_major) return values;
    std::vector<scalar_t> arranged(values.size());
    for (long b = 0; b < batch; ++b)
      for (long n = 0; n < rows; ++n)
        for (long k = 0; k < cols; ++k) arranged[(k * batch + b) * rows + n] = values[(b * rows + n) * cols + k];
    return arranged;
  }
  std::tuple<int64_t, int64_t, int64_t> strides(long batch, long rows, long cols) const {
    if (channel_major) return {rows, 1, batch * rows};
    return {rows * cols, cols, 1};
  }
};

inline Layout layout_named(const std::string& name) {
  if (name != "token-major" && name != "channel-major") {
    fprintf(stderr, "layout %s: expected token-major or channel-major\n", name.c_str());
    exit(2);
  }
  return Layout{name == "channel-major"};
}
