// CPU kernels of the fused depth read (attnres.ops.fused._DepthAttend): S folded queries against N
// listed sources, forward and backward, one token at a time.
//
// Why a kernel: in eager PyTorch every step of the read is a full pass over a [M, d] source (dots,
// weighted sum, and four or five more in the backward), so a read costs ~15 passes over each of its
// sources. Here each token's N source rows (N * d values, a few KiB) are read from memory once and
// then reused from cache: the forward reads every source once and the backward reads it once and
// writes its gradient once.
//
// Math per token (z logits, a softmax weights, o outputs; see fused.py for the derivation):
//   z_sj = r_j (v_j . q_s),  a_sj = exp(z_sj - lse_s),  o_s = sum_j a_sj v_j
//   dz_sj = a_sj (g_s . v_j - g_s . o_s + dlse_s)
//   dv_j = sum_s a_sj g_s + dz_sj r_j q_s,  dq_s = sum_tokens sum_j dz_sj r_j v_j,
//   dr_j = sum_s dz_sj (v_j . q_s)
// Statistics and accumulation run in the op-math type (float for float/bf16/half, double for double).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Tests set this so that every output starts as NaN: an element a kernel forgets to write shows up.
bool poison_outputs = false;

at::Tensor new_output(at::IntArrayRef size, const at::TensorOptions& options) {
  return poison_outputs ? at::full(size, std::numeric_limits<double>::quiet_NaN(), options)
                        : at::empty(size, options);
}

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const acc_t* b, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < d; ++k) sum += static_cast<acc_t>(a[k]) * b[k];
  return sum;
}

void check_sources(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& rstd,
                   const at::Tensor& queries) {
  TORCH_CHECK(!sources.empty(), "depth_attend: at least one source");
  TORCH_CHECK(rstd.size() == sources.size(), "depth_attend: one rstd per source");
  TORCH_CHECK(sources[0].dim() == 2, "depth_attend: sources must be [M, d]");
  const auto m = sources[0].size(0), d = sources[0].size(1);
  for (size_t j = 0; j < sources.size(); ++j) {
    TORCH_CHECK(sources[j].device().is_cpu() && sources[j].is_contiguous() && sources[j].dim() == 2 &&
                    sources[j].size(0) == m && sources[j].size(1) == d &&
                    sources[j].scalar_type() == sources[0].scalar_type(),
                "depth_attend: sources must be contiguous CPU [M, d] tensors of one dtype");
    TORCH_CHECK(rstd[j].device().is_cpu() && rstd[j].is_contiguous() && rstd[j].numel() == m &&
                    rstd[j].scalar_type() == queries.scalar_type(),
                "depth_attend: rstd must be contiguous CPU [M] in the statistics dtype");
  }
  TORCH_CHECK(queries.device().is_cpu() && queries.is_contiguous() && queries.dim() == 2 &&
                  queries.size(1) == d,
              "depth_attend: queries must be contiguous CPU [S, d]");
}

// Pragmas cannot sit inside the AT_DISPATCH macro's argument, so each kernel is a template that the
// dispatch only instantiates.
template <typename scalar_t>
void forward_kernel(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& rstd,
                    const at::Tensor& queries, at::Tensor& outs, at::Tensor& lse, at::Tensor& alpha,
                    at::Tensor& dots) {
  using acc_t = at::opmath_type<scalar_t>;
  TORCH_CHECK(queries.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
              "depth_attend: queries must be in the statistics dtype");
  const int64_t n = sources.size(), m = sources[0].size(0), d = sources[0].size(1), s = queries.size(0);
  std::vector<const scalar_t*> src(n);
  std::vector<const acc_t*> rs(n);
  for (int64_t j = 0; j < n; ++j) {
    src[j] = sources[j].data_ptr<scalar_t>();
    rs[j] = rstd[j].data_ptr<acc_t>();
  }
  const acc_t* q = queries.data_ptr<acc_t>();
  acc_t* out = outs.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* alpha_p = alpha.data_ptr<acc_t>();
  acc_t* dots_p = dots.data_ptr<acc_t>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(n * s);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* v = src[j] + t * d;
        for (int64_t i = 0; i < s; ++i) {
          const acc_t dt = dot<acc_t>(v, q + i * d, d);
          dots_p[(j * m + t) * s + i] = dt;
          z[j * s + i] = dt * rs[j][t];
        }
      }
      for (int64_t i = 0; i < s; ++i) {
        acc_t top = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n; ++j) top = std::max(top, z[j * s + i]);
        acc_t total = 0;
        for (int64_t j = 0; j < n; ++j) {
          z[j * s + i] = std::exp(z[j * s + i] - top);
          total += z[j * s + i];
        }
        lse_p[t * s + i] = top + std::log(total);
        acc_t* o = out + (i * m + t) * d;
        std::fill(o, o + d, acc_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const acc_t a = z[j * s + i] / total;
          alpha_p[(j * m + t) * s + i] = a;
          const scalar_t* v = src[j] + t * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) o[k] += a * static_cast<acc_t>(v[k]);
        }
      }
    }
  });
}

// Returns outs [S, M, d], lse [M, S], alpha [N, M, S], dots [N, M, S] (statistics dtype).
std::vector<at::Tensor> forward(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& rstd,
                                const at::Tensor& queries) {
  check_sources(sources, rstd, queries);
  const int64_t n = sources.size(), m = sources[0].size(0), d = sources[0].size(1), s = queries.size(0);
  auto opts = queries.options();
  auto outs = new_output({s, m, d}, opts);
  auto lse = new_output({m, s}, opts);
  auto alpha = new_output({n, m, s}, opts);
  auto dots = new_output({n, m, s}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, sources[0].scalar_type(), "depth_attend_fwd",
      [&] { forward_kernel<scalar_t>(sources, rstd, queries, outs, lse, alpha, dots); });
  return {outs, lse, alpha, dots};
}

template <typename scalar_t>
void backward_kernel(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& rstd,
                     const at::Tensor& queries, const at::Tensor& alpha, const at::Tensor& dots,
                     const std::vector<at::Tensor>& grads, const at::Tensor& glse,
                     std::vector<at::Tensor>& dsrc, std::vector<at::Tensor>& drstd, at::Tensor& dq_parts,
                     int64_t grain) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = sources.size(), m = sources[0].size(0), d = sources[0].size(1), s = queries.size(0);
  std::vector<const scalar_t*> src(n);
  std::vector<scalar_t*> dsrc_p(n);
  std::vector<const acc_t*> rs(n);
  std::vector<acc_t*> drs(n);
  for (int64_t j = 0; j < n; ++j) {
    src[j] = sources[j].data_ptr<scalar_t>();
    dsrc_p[j] = dsrc[j].data_ptr<scalar_t>();
    rs[j] = rstd[j].data_ptr<acc_t>();
    drs[j] = drstd[j].data_ptr<acc_t>();
  }
  std::vector<const acc_t*> g(s, nullptr);
  for (int64_t i = 0; i < s; ++i)
    if (grads[i].defined()) g[i] = grads[i].data_ptr<acc_t>();
  const acc_t* glse_p = glse.defined() ? glse.data_ptr<acc_t>() : nullptr;
  const acc_t* q = queries.data_ptr<acc_t>();
  const acc_t* alpha_p = alpha.data_ptr<acc_t>();
  const acc_t* dots_p = dots.data_ptr<acc_t>();
  acc_t* dq_all = dq_parts.data_ptr<acc_t>();
  // Parallel over chunks of `grain` tokens, not over tokens: at::parallel_for splits a range into
  // pieces of its own choosing, and each chunk must own exactly one slice of dq_parts.
  const int64_t chunks = dq_parts.size(0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> dz(n * s), row(d), zeros(d, acc_t(0));  // zeros: a missing output gradient
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dq = dq_all + chunk * s * d;
      for (int64_t t = chunk * grain; t < std::min(m, (chunk + 1) * grain); ++t) {
        // dz_sj = a_sj (g_s . v_j - sum_j' a_sj' g_s . v_j' + dlse_s)
        for (int64_t i = 0; i < s; ++i) {
          acc_t mean = 0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t gv = g[i] ? dot<acc_t>(src[j] + t * d, g[i] + t * d, d) : acc_t(0);
            dz[j * s + i] = gv;
            mean += alpha_p[(j * m + t) * s + i] * gv;
          }
          const acc_t shift = (glse_p ? glse_p[t * s + i] : acc_t(0)) - mean;
          for (int64_t j = 0; j < n; ++j)
            dz[j * s + i] = alpha_p[(j * m + t) * s + i] * (dz[j * s + i] + shift);
        }
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* v = src[j] + t * d;
          const acc_t r = rs[j][t];
          scalar_t* dv = dsrc_p[j] + t * d;
          acc_t dr = 0;
          for (int64_t i = 0; i < s; ++i) dr += dz[j * s + i] * dots_p[(j * m + t) * s + i];
          drs[j][t] = dr;
          if (s == 1) {  // the fused read: one pass over the row writes dv and accumulates dq
            const acc_t a = alpha_p[j * m + t], c = dz[j] * r;
            const acc_t* gi = g[0] ? g[0] + t * d : zeros.data();
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) {
              const acc_t vk = static_cast<acc_t>(v[k]);
              dv[k] = static_cast<scalar_t>(a * gi[k] + c * q[k]);
              dq[k] += c * vk;
            }
            continue;
          }
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t i = 0; i < s; ++i) {
            const acc_t a = alpha_p[(j * m + t) * s + i], c = dz[j * s + i] * r;
            const acc_t* qi = q + i * d;
            const acc_t* gi = g[i] ? g[i] + t * d : zeros.data();
            acc_t* dqi = dq + i * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) {
              row[k] += a * gi[k] + c * qi[k];
              dqi[k] += c * static_cast<acc_t>(v[k]);
            }
          }
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) dv[k] = static_cast<scalar_t>(row[k]);
        }
      }
    }
  });
}

// grads: S output gradients [M, d] (statistics dtype; undefined = zero), glse [M, S] or undefined.
// Returns dsources (N x [M, d], source dtype), dqueries [S, d], drstd (N x [M]).
std::vector<at::Tensor> backward(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& rstd,
                                 const at::Tensor& queries, const at::Tensor& alpha, const at::Tensor& dots,
                                 const std::vector<at::Tensor>& grads, const at::Tensor& glse) {
  check_sources(sources, rstd, queries);
  const int64_t n = sources.size(), m = sources[0].size(0), d = sources[0].size(1), s = queries.size(0);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == s, "depth_attend backward: one gradient per query");
  // the kernel reads these raw: shapes, dtype and layout as the forward saved them
  auto saved_ok = [&](const at::Tensor& t, std::initializer_list<int64_t> shape) {
    return t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == queries.scalar_type() &&
           t.sizes() == at::IntArrayRef(shape);
  };
  TORCH_CHECK(saved_ok(alpha, {n, m, s}) && saved_ok(dots, {n, m, s}),
              "depth_attend backward: alpha and dots must be the forward's [N, M, S]");
  for (const auto& g : grads)
    TORCH_CHECK(!g.defined() || saved_ok(g, {m, d}),
                "depth_attend backward: output gradients must be contiguous [M, d] in the statistics dtype");
  TORCH_CHECK(!glse.defined() || saved_ok(glse, {m, s}), "depth_attend backward: glse must be [M, S]");
  std::vector<at::Tensor> dsrc(n), drstd(n);
  for (int64_t j = 0; j < n; ++j) {
    dsrc[j] = new_output({m, d}, sources[j].options());
    drstd[j] = new_output({m}, queries.options());
  }
  // Per-chunk partial query gradients, summed at the end (no shared writes across threads). The
  // chunk size is fixed, not derived from the thread count, so the partials and their sum are the
  // same on every machine: gradients are bitwise independent of the number of threads.
  constexpr int64_t grain = 64;
  auto dq_parts = at::zeros({(m + grain - 1) / grain, s, d}, queries.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "depth_attend_bwd",
                                  [&] {
                                    backward_kernel<scalar_t>(sources, rstd, queries, alpha, dots, grads,
                                                              glse, dsrc, drstd, dq_parts, grain);
                                  });
  std::vector<at::Tensor> result(dsrc);
  result.push_back(dq_parts.sum(0));
  result.insert(result.end(), drstd.begin(), drstd.end());
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused depth read forward (CPU)");
  m.def("backward", &backward, "fused depth read backward (CPU)");
  m.def(
      "set_poison_outputs", [](bool on) { poison_outputs = on; }, "tests: fill every output with NaN first");
}
