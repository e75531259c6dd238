// prunekit's optional CPU kernels: two memory-bound loops that eager PyTorch runs as several full passes.
// Built on first use by prunekit.kernels (torch.utils.cpp_extension.load); every caller has an eager fallback
// that computes the same numbers, so a machine without a compiler loses only speed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

void check_float2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              what, " must be a contiguous 2-D float32 CPU tensor");
}

}  // namespace

// scores[i, j] = momentum * scores[i, j] + sum over the bh x bw tile (i, j) of |weight * grad|  (|grad| when
// weight is None). One pass over weight and grad instead of product, abs, tile sum and momentum add.
// momentum == 0 overwrites scores without reading them (a fresh buffer may hold anything). With `keep` (float,
// laid out like scores) the gradient is then multiplied by its tile's keep value, row by row while the row is
// still in cache: the gradient mask costs no pass of its own.
void score_step_(const c10::optional<torch::Tensor>& weight, torch::Tensor& grad, torch::Tensor& scores,
                 int64_t bh, int64_t bw, double momentum, const c10::optional<torch::Tensor>& keep) {
  check_float2d(grad, "grad");
  check_float2d(scores, "scores");
  const int64_t rows = grad.size(0), cols = grad.size(1);
  TORCH_CHECK(bh > 0 && bw > 0 && rows % bh == 0 && cols % bw == 0 && scores.size(0) == rows / bh &&
              scores.size(1) == cols / bw, "scores shape does not match the tiles");
  const float* w = nullptr;
  if (weight.has_value()) {
    check_float2d(*weight, "weight");
    TORCH_CHECK(weight->sizes() == grad.sizes(), "weight and grad shapes differ");
    w = weight->data_ptr<float>();
  }
  const float* k = nullptr;
  if (keep.has_value()) {
    check_float2d(*keep, "keep");
    TORCH_CHECK(keep->sizes() == scores.sizes(), "keep and scores shapes differ");
    k = keep->data_ptr<float>();
  }
  float* g = grad.data_ptr<float>();
  float* s = scores.data_ptr<float>();
  const float a = static_cast<float>(momentum);
  const int64_t tile_cols = cols / bw;
  // a thread's share is at least ~32k elements: smaller ones cost more to hand out than to compute
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (bh * cols));
  at::parallel_for(0, rows / bh, grain, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      float* srow = s + ti * tile_cols;
      const float* krow = k ? k + ti * tile_cols : nullptr;
      for (int64_t r = 0; r < bh; ++r) {
        const int64_t off = (ti * bh + r) * cols;
        float* gr = g + off;
        const float* wr = w ? w + off : nullptr;
        const bool first = r == 0;
        if (bw == 1) {  // one column a tile (1x1, 4x1, N:M): a straight vectorisable loop
          if (first && a == 0.0f) {
            if (wr) for (int64_t j = 0; j < cols; ++j) srow[j] = std::fabs(wr[j] * gr[j]);
            else for (int64_t j = 0; j < cols; ++j) srow[j] = std::fabs(gr[j]);
          } else if (first) {
            if (wr) for (int64_t j = 0; j < cols; ++j) srow[j] = a * srow[j] + std::fabs(wr[j] * gr[j]);
            else for (int64_t j = 0; j < cols; ++j) srow[j] = a * srow[j] + std::fabs(gr[j]);
          } else {
            if (wr) for (int64_t j = 0; j < cols; ++j) srow[j] += std::fabs(wr[j] * gr[j]);
            else for (int64_t j = 0; j < cols; ++j) srow[j] += std::fabs(gr[j]);
          }
        } else {
          for (int64_t tj = 0; tj < tile_cols; ++tj) {
            float acc = 0.0f;
            const int64_t c0 = tj * bw;
            if (wr) for (int64_t j = 0; j < bw; ++j) acc += std::fabs(wr[c0 + j] * gr[c0 + j]);
            else for (int64_t j = 0; j < bw; ++j) acc += std::fabs(gr[c0 + j]);
            srow[tj] = first ? (a == 0.0f ? acc : a * srow[tj] + acc) : srow[tj] + acc;
          }
        }
        if (krow) {
          if (bw == 1) for (int64_t j = 0; j < cols; ++j) gr[j] *= krow[j];
          else for (int64_t j = 0; j < cols; ++j) gr[j] *= krow[j / bw];
        }
      }
    }
  });
}

// One radix-select pass over int32 keys: hist[d] += #{keys whose top `done` bits equal `prefix` and whose next
// `width` bits are d}. The first pass (done == 0) reads the top digit as signed and offsets it by bins / 2, like
// the eager path. One read of the keys, no filtered copy.
void radix_hist_(const torch::Tensor& keys, torch::Tensor& hist, int64_t done, int64_t prefix, int64_t width) {
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == torch::kInt32 && keys.is_contiguous(),
              "keys must be a contiguous int32 CPU tensor");
  TORCH_CHECK(hist.scalar_type() == torch::kInt64 && hist.is_contiguous() && hist.numel() == (int64_t{1} << width),
              "hist must be a contiguous int64 tensor of 2**width bins");
  TORCH_CHECK(done >= 0 && width > 0 && done + width <= 32, "bad radix pass");
  const int32_t* k = keys.data_ptr<int32_t>();
  int64_t* h = hist.data_ptr<int64_t>();
  const int64_t n = keys.numel();
  const int shift = static_cast<int>(32 - done - width);
  const int32_t mask = static_cast<int32_t>((int64_t{1} << width) - 1);
  if (done == 0) {
    // four interleaved sub-histograms: consecutive keys often share a bin, and one counter would serialise
    // every increment on the previous one
    const int64_t bins = int64_t{1} << width;
    const int32_t half = static_cast<int32_t>(bins >> 1);
    std::vector<int64_t> sub(4 * bins, 0);
    int64_t* h0 = sub.data();
    int64_t* h1 = h0 + bins;
    int64_t* h2 = h1 + bins;
    int64_t* h3 = h2 + bins;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {  // arithmetic shift: the top digit is signed
      ++h0[(k[i] >> shift) + half];
      ++h1[(k[i + 1] >> shift) + half];
      ++h2[(k[i + 2] >> shift) + half];
      ++h3[(k[i + 3] >> shift) + half];
    }
    for (; i < n; ++i) ++h0[(k[i] >> shift) + half];
    for (int64_t b = 0; b < bins; ++b) h[b] += h0[b] + h1[b] + h2[b] + h3[b];
    return;
  }
  // branch-free: a key outside the prefix counts into a sink bin past the end (a prefix match is a coin toss
  // for the branch predictor in the second pass)
  const int top = static_cast<int>(32 - done);
  const int32_t want = static_cast<int32_t>(prefix);
  const int32_t sink = mask + 1;
  std::vector<int64_t> local(static_cast<size_t>(sink) + 1, 0);
  int64_t* l = local.data();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = k[i];
    ++l[(key >> top) == want ? ((key >> shift) & mask) : sink];
  }
  for (int32_t b = 0; b < sink; ++b) h[b] += l[b];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("score_step_", &score_step_, "fused |W*G| tile sum with momentum, in place");
  m.def("radix_hist_", &radix_hist_, "one radix-select histogram pass over int32 keys, in place");
}
