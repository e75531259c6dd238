// prunekit's optional CPU kernels: loops that eager PyTorch runs as several full passes over a tensor.
// Built on first use by prunekit.kernels (torch.utils.cpp_extension.load); every caller has an eager fallback
// that computes the same numbers up to float summation order, so a machine without a compiler loses only speed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

void check_float2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              what, " must be a contiguous 2-D float32 CPU tensor");
}

// One pass of score_step_ over tile rows [begin, end). The step term is |w * g| (Weighted) or |g|; a tile row's
// scores are first scaled by `a` (or overwritten when a == 0, so a fresh buffer is never read), then each of its
// bh weight rows adds its terms; a row of the gradient is masked right after, while it is still in cache.
template <bool Weighted>
void score_rows(const float* w, float* g, float* s, const float* k, int64_t begin, int64_t end, int64_t bh,
                int64_t bw, int64_t cols, float a) {
  const int64_t tile_cols = cols / bw;
  for (int64_t ti = begin; ti < end; ++ti) {
    float* srow = s + ti * tile_cols;
    const float* krow = k ? k + ti * tile_cols : nullptr;
    for (int64_t r = 0; r < bh; ++r) {
      const int64_t off = (ti * bh + r) * cols;
      float* gr = g + off;
      const float* wr = Weighted ? w + off : nullptr;
      const float scale = r == 0 ? a : 1.0f;  // scaling by 1.0 is exact: later rows just add
      if (bw == 1) {  // one column a tile (1x1, 4x1, N:M): straight vectorisable loops
        if (scale == 0.0f) {
          for (int64_t j = 0; j < cols; ++j) srow[j] = std::fabs(Weighted ? wr[j] * gr[j] : gr[j]);
        } else {
          for (int64_t j = 0; j < cols; ++j) srow[j] = scale * srow[j] + std::fabs(Weighted ? wr[j] * gr[j] : gr[j]);
        }
        if (krow) for (int64_t j = 0; j < cols; ++j) gr[j] *= krow[j];
      } else {
        for (int64_t tj = 0; tj < tile_cols; ++tj) {
          float acc = 0.0f;
          for (int64_t j = tj * bw; j < (tj + 1) * bw; ++j) acc += std::fabs(Weighted ? wr[j] * gr[j] : gr[j]);
          srow[tj] = scale == 0.0f ? acc : scale * srow[tj] + acc;
        }
        if (krow) for (int64_t j = 0; j < cols; ++j) gr[j] *= krow[j / bw];
      }
    }
  }
}

}  // namespace

// scores[i, j] = momentum * scores[i, j] + sum over the bh x bw tile (i, j) of |weight * grad|  (|grad| when
// weight is None). One pass over weight and grad instead of product, abs, tile sum and momentum add.
// momentum == 0 overwrites scores without reading them (a fresh buffer may hold anything). With `keep` (float,
// laid out like scores) the gradient is then multiplied by its tile's keep value: the gradient mask costs no
// pass of its own.
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
  // a thread's share is at least ~32k elements: smaller ones cost more to hand out than to compute
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (bh * cols));
  at::parallel_for(0, rows / bh, grain, [&](int64_t begin, int64_t end) {
    if (w) score_rows<true>(w, g, s, k, begin, end, bh, bw, cols, a);
    else score_rows<false>(w, g, s, k, begin, end, bh, bw, cols, a);
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
    const int32_t half = mask / 2 + 1;  // the top digit is signed (arithmetic shift): offset it into [0, bins)
    for (int64_t i = 0; i < n; ++i) ++h[(k[i] >> shift) + half];
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

namespace {

// One N:M group: rank_i = #{j : x_j < x_i, or x_j == x_i and j < i}; bit i set when rank_i < n. Branch-free, and
// with M fixed at compile time the loops unroll.
template <int M>
inline int32_t nm_group_bits(const float* x, int64_t n, int64_t m_runtime) {
  const int64_t m = M > 0 ? M : m_runtime;
  int32_t low = 0;
  for (int64_t i = 0; i < m; ++i) {
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += !(x[i] < x[j]);
    for (int64_t j = i + 1; j < m; ++j) rank += x[j] < x[i];
    low |= static_cast<int32_t>(rank < n) << i;
  }
  return low;
}

template <int M>
void nm_lowest_loop(const float* s, float* u, int32_t* b, int64_t groups, int64_t n, int64_t m_runtime,
                    int64_t reduce) {
  const int64_t m = M > 0 ? M : m_runtime;
  at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const float* x = s + g * m;
      const int32_t low = nm_group_bits<M>(x, n, m);
      float acc;
      if (reduce == 2) {
        acc = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < m; ++i) if ((low >> i) & 1) acc = std::max(acc, x[i]);
      } else {
        acc = 0.0f;
        for (int64_t i = 0; i < m; ++i) acc += x[i] * static_cast<float>((low >> i) & 1);
        if (reduce == 1) acc /= static_cast<float>(n);
      }
      u[g] = acc;
      b[g] = low;
    }
  });
}

}  // namespace

// N:M: for every group of m consecutive scores, the n lowest (ties: the lower index) as a bit set, and the
// group's unit score over them: sum (reduce 0), mean (1) or max (2). The same arithmetic as the eager path
// (position order, non-chosen scores multiplied by 0), in one pass instead of ~m^2/2 full-tensor comparisons.
std::vector<torch::Tensor> nm_lowest(const torch::Tensor& scores, int64_t n, int64_t m, int64_t reduce) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == torch::kFloat32 && scores.is_contiguous(),
              "scores must be a contiguous float32 CPU tensor");
  TORCH_CHECK(m >= 1 && m <= 16 && n >= 1 && n <= m && scores.numel() % m == 0 && reduce >= 0 && reduce <= 2,
              "bad N:M parameters");
  const int64_t groups = scores.numel() / m;
  auto unit = torch::empty({groups}, scores.options());
  auto bits = torch::empty({groups}, scores.options().dtype(torch::kInt32));
  const float* s = scores.data_ptr<float>();
  float* u = unit.data_ptr<float>();
  int32_t* b = bits.data_ptr<int32_t>();
  if (m == 4) nm_lowest_loop<4>(s, u, b, groups, n, m, reduce);  // 2:4, 1:4: the common cases
  else if (m == 8) nm_lowest_loop<8>(s, u, b, groups, n, m, reduce);
  else nm_lowest_loop<0>(s, u, b, groups, n, m, reduce);
  return {unit, bits};
}

// The N:M keep-mask: element i of group g is pruned when the group is pruned and i is among its n lowest.
torch::Tensor nm_keep(const torch::Tensor& bits, const torch::Tensor& pruned, int64_t m) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == torch::kInt32 && bits.is_contiguous() &&
              pruned.device().is_cpu() && pruned.scalar_type() == torch::kBool && pruned.is_contiguous() &&
              pruned.numel() == bits.numel() && m >= 1 && m <= 16, "bad N:M keep arguments");
  const int64_t groups = bits.numel();
  auto keep = torch::empty({groups * m}, pruned.options());
  const int32_t* b = bits.data_ptr<int32_t>();
  const bool* p = pruned.data_ptr<bool>();
  bool* k = keep.data_ptr<bool>();
  auto loop = [&](auto fixed) {
    constexpr int M = decltype(fixed)::value;
    const int64_t mm = M > 0 ? M : m;
    at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int32_t cut = b[g] & -static_cast<int32_t>(p[g]);  // the bit set, or 0 for a kept group
        for (int64_t i = 0; i < mm; ++i) k[g * mm + i] = !((cut >> i) & 1);
      }
    });
  };
  if (m == 4) loop(std::integral_constant<int, 4>{});
  else if (m == 8) loop(std::integral_constant<int, 8>{});
  else loop(std::integral_constant<int, 0>{});
  return keep;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nm_lowest", &nm_lowest, "N:M: the n lowest of every group (bit set) and the group scores");
  m.def("nm_keep", &nm_keep, "N:M keep-mask from the group bit sets and the pruned groups");
  m.def("score_step_", &score_step_, "fused |W*G| tile sum with momentum, in place");
  m.def("radix_hist_", &radix_hist_, "one radix-select histogram pass over int32 keys, in place");
}
