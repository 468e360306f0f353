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

// One token of the attend: its N source rows v[j] (d values each, statistics r[j]) against S
// queries. Writes the S outputs o_s = sum_j a_sj v_j at out + i * out_stride, the log-sum-exp at
// lse[i * lse_stride] (if lse), and, for a backward, v_j . q_s and a_sj at [j * stat_stride + i]
// (if dots / alpha). z is n * s scratch. Shared by the training forward and the no-grad stack read,
// so the two compute every token the same way.
template <typename acc_t, typename scalar_t>
inline void attend_token(int64_t n, int64_t s, int64_t d, const scalar_t* const* v, const acc_t* r,
                         const acc_t* q, acc_t* z, acc_t* out, int64_t out_stride, acc_t* lse,
                         int64_t lse_stride, acc_t* dots, acc_t* alpha, int64_t stat_stride) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < s; ++i) {
      const acc_t dt = dot<acc_t>(v[j], q + i * d, d);
      if (dots) dots[j * stat_stride + i] = dt;
      z[j * s + i] = dt * r[j];
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
    if (lse) lse[i * lse_stride] = top + std::log(total);
    acc_t* o = out + i * out_stride;
    std::fill(o, o + d, acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = z[j * s + i] / total;
      if (alpha) alpha[j * stat_stride + i] = a;
      const scalar_t* vj = v[j];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) o[k] += a * static_cast<acc_t>(vj[k]);
    }
  }
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
    std::vector<acc_t> z(n * s), r(n);
    std::vector<const scalar_t*> v(n);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < n; ++j) {
        v[j] = src[j] + t * d;
        r[j] = rs[j][t];
      }
      // outs [S, M, d]; lse [M, S]; alpha, dots [N, M, S]
      attend_token<acc_t>(n, s, d, v.data(), r.data(), q, z.data(), out + t * d, m * d, lse_p + t * s, 1,
                          dots_p + t * s, alpha_p + t * s, m * s);
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

// --- no-grad reads (prefill and decoding; attnres.ops.stacked) ------------------------------------
// Nothing is saved for a backward, so these take the completed blocks as one preallocated stack and
// return outputs only.

// Phase 1 against the first n blocks of a stack: values [C, M, d] and rstd [C, M, 1], queries
// [S, d], all in the statistics dtype and contiguous. Returns outs [M, S, d] and lse [M, S] (an
// empty tensor unless need_lse).
template <typename acc_t>
void stack_phase1_kernel(const at::Tensor& values, const at::Tensor& rstd, int64_t n, const at::Tensor& queries,
                         at::Tensor& outs, at::Tensor& lse, bool need_lse) {
  const int64_t m = values.size(1), d = values.size(2), s = queries.size(0);
  const acc_t* vals = values.data_ptr<acc_t>();
  const acc_t* rs = rstd.data_ptr<acc_t>();
  const acc_t* q = queries.data_ptr<acc_t>();
  acc_t* out = outs.data_ptr<acc_t>();
  acc_t* lse_p = need_lse ? lse.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(n * s), r(n);
    std::vector<const acc_t*> v(n);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < n; ++j) {
        v[j] = vals + (j * m + t) * d;
        r[j] = rs[j * m + t];
      }
      attend_token<acc_t>(n, s, d, v.data(), r.data(), q, z.data(), out + t * s * d, d,
                          lse_p ? lse_p + t * s : nullptr, 1, nullptr, nullptr, 0);
    }
  });
}

std::vector<at::Tensor> stack_phase1(const at::Tensor& values, const at::Tensor& rstd, int64_t n,
                                     const at::Tensor& queries, bool need_lse) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 3 && values.is_contiguous(),
              "stack_phase1: values must be a contiguous CPU [C, M, d] stack");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "stack_phase1: the stack must be in a statistics dtype (float32 or float64)");
  const int64_t c = values.size(0), m = values.size(1), d = values.size(2);
  TORCH_CHECK(1 <= n && n <= c, "stack_phase1: n must be in [1, ", c, "], got ", n);
  TORCH_CHECK(rstd.device().is_cpu() && rstd.is_contiguous() && rstd.numel() == c * m &&
                  rstd.scalar_type() == values.scalar_type(),
              "stack_phase1: rstd must be a contiguous [C, M, 1] stack in the stack's dtype");
  TORCH_CHECK(queries.device().is_cpu() && queries.is_contiguous() && queries.dim() == 2 &&
                  queries.size(1) == d && queries.size(0) >= 1 && queries.scalar_type() == values.scalar_type(),
              "stack_phase1: queries must be contiguous [S, d] in the stack's dtype");
  const int64_t s = queries.size(0);
  auto outs = new_output({m, s, d}, values.options());
  auto lse = need_lse ? new_output({m, s}, values.options()) : at::empty({0}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "stack_phase1",
                             [&] { stack_phase1_kernel<scalar_t>(values, rstd, n, queries, outs, lse, need_lse); });
  return {outs, lse};
}

// Phase 2 for one read, h = o + sigma(r_p (p . q) - lse) (p - o), and then, if weight is given, the
// RMSNorm that consumes the read: h * rsqrt(mean(h^2) + eps) * weight. One pass per token, in the
// statistics dtype, rounded once to the output dtype scalar_t. o [M, d] (statistics dtype) may have
// any row stride with unit stride along d, lse [M] any stride; p (M * d values) and r_p (M) are
// contiguous; q [d]. Without p (merge = false) h = o: a group's first read, which sees only blocks.
template <typename scalar_t>
void finish_read_kernel(const at::Tensor& o, const at::Tensor& lse, const at::Tensor& p, const at::Tensor& p_rstd,
                        const at::Tensor& q, const at::Tensor& weight, double eps, at::Tensor& result) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool merge = p.defined();
  const int64_t m = o.size(0), d = o.size(1), o_row = o.stride(0);
  const acc_t* o_p = o.data_ptr<acc_t>();
  const int64_t lse_step = merge ? lse.stride(0) : 0;
  const acc_t* lse_p = merge ? lse.data_ptr<acc_t>() : nullptr;
  const scalar_t* p_p = merge ? p.data_ptr<scalar_t>() : nullptr;
  const acc_t* r_p = merge ? p_rstd.data_ptr<acc_t>() : nullptr;
  const acc_t* q_p = merge ? q.data_ptr<acc_t>() : nullptr;
  const scalar_t* w_p = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
  scalar_t* res = result.data_ptr<scalar_t>();
  const acc_t eps_ = static_cast<acc_t>(eps);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(d);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* ot = o_p + t * o_row;
      acc_t sq = 0;
      if (merge) {
        const scalar_t* pt = p_p + t * d;
        const acc_t x = dot<acc_t>(pt, q_p, d) * r_p[t] - lse_p[t * lse_step];
        const acc_t w = acc_t(1) / (acc_t(1) + std::exp(-x));
#pragma omp simd reduction(+ : sq)
        for (int64_t k = 0; k < d; ++k) {
          h[k] = ot[k] + w * (static_cast<acc_t>(pt[k]) - ot[k]);
          sq += h[k] * h[k];
        }
      } else {
#pragma omp simd reduction(+ : sq)
        for (int64_t k = 0; k < d; ++k) {
          h[k] = ot[k];
          sq += h[k] * h[k];
        }
      }
      scalar_t* out = res + t * d;
      if (!w_p) {
        for (int64_t k = 0; k < d; ++k) out[k] = static_cast<scalar_t>(h[k]);
        continue;
      }
      const acc_t scale = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(d) + eps_);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) out[k] = static_cast<scalar_t>(h[k] * scale * static_cast<acc_t>(w_p[k]));
    }
  });
}

c10::ScalarType stats_type(c10::ScalarType t) { return c10::toRealValueType(at::toOpMathType(t)); }

// o is a phase-1 output [M, d]; `like` is a [..., d] tensor of M rows in the output dtype, whose
// shape the result takes (contiguous).
at::Tensor finish_read(const at::Tensor& o, const at::Tensor& lse, const at::Tensor& p, const at::Tensor& p_rstd,
                       const at::Tensor& q, const std::optional<at::Tensor>& weight, double eps, const at::Tensor& like,
                       const char* name) {
  TORCH_CHECK(like.device().is_cpu() && like.dim() >= 1, name, ": the stream tensor must be a CPU [..., d] tensor");
  const int64_t d = like.size(-1), m = d ? like.numel() / d : 0;
  TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == stats_type(like.scalar_type()) && o.dim() == 2 &&
                  o.size(0) == m && o.size(1) == d && o.stride(1) == 1,
              name, ": o must be [M, d] in the statistics dtype with unit stride along d");
  at::Tensor w;
  if (weight.has_value() && weight->defined()) {
    w = *weight;
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == d && w.is_contiguous() &&
                    w.scalar_type() == like.scalar_type(),
                name, ": the norm weight must be a contiguous [d] vector in the stream dtype");
  }
  auto result = new_output(like.sizes(), like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, like.scalar_type(), "finish_read",
                                  [&] { finish_read_kernel<scalar_t>(o, lse, p, p_rstd, q, w, eps, result); });
  return result;
}

// The merge (+ norm) of a read inside a group: returns p's shape and dtype.
at::Tensor stack_merge(const at::Tensor& o, const at::Tensor& lse, const at::Tensor& p, const at::Tensor& p_rstd,
                       const at::Tensor& q, const std::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK(p.is_contiguous(), "stack_merge: the partial sum must be contiguous");
  const auto cd = stats_type(p.scalar_type());
  const int64_t d = p.dim() ? p.size(-1) : 0, m = d ? p.numel() / d : 0;
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == cd && lse.dim() == 1 && lse.size(0) == m,
              "stack_merge: lse must be [M] (statistics dtype)");
  TORCH_CHECK(p_rstd.device().is_cpu() && p_rstd.scalar_type() == cd && p_rstd.numel() == m && p_rstd.is_contiguous(),
              "stack_merge: r_p must be contiguous, one per token (statistics dtype)");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == cd && q.dim() == 1 && q.size(0) == d && q.is_contiguous(),
              "stack_merge: q must be a contiguous [d] vector in the statistics dtype");
  return finish_read(o, lse, p, p_rstd, q, weight, eps, p, "stack_merge");
}

// A group's first read: o in like's shape and dtype, RMS-normalised if weight is given.
at::Tensor stack_norm(const at::Tensor& o, const at::Tensor& like, const std::optional<at::Tensor>& weight,
                      double eps) {
  return finish_read(o, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), weight, eps, like, "stack_norm");
}

// A sublayer output entering the no-grad state: the new partial sum p = partial + out (p = out,
// copied, when partial is undefined: the output opens a block, or it is the embedding) and its
// statistic rsqrt(mean(p^2) + eps), in one pass. out may have any strides; partial, if given, is
// contiguous, of out's shape and dtype. Returns p (contiguous, out's shape) and r (out's shape without
// d, statistics dtype).
template <typename scalar_t>
void accumulate_kernel(const at::Tensor& partial, const at::Tensor& out, double eps, at::Tensor& p, at::Tensor& r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = out.size(-1), m = out.numel() / d;
  const scalar_t* prev = partial.defined() ? partial.data_ptr<scalar_t>() : nullptr;
  const scalar_t* add = out.data_ptr<scalar_t>();
  scalar_t* p_p = p.data_ptr<scalar_t>();
  acc_t* r_p = r.data_ptr<acc_t>();
  const acc_t eps_ = static_cast<acc_t>(eps);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* row = p_p + t * d;
      const scalar_t* a = add + t * d;
      if (prev) {
        const scalar_t* b = prev + t * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) row[k] = static_cast<scalar_t>(static_cast<acc_t>(b[k]) + static_cast<acc_t>(a[k]));
      } else {
        std::copy(a, a + d, row);
      }
      // the statistic of the sum as the state stores it (rounded to the stream dtype)
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t k = 0; k < d; ++k) sq += static_cast<acc_t>(row[k]) * static_cast<acc_t>(row[k]);
      r_p[t] = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(d) + eps_);
    }
  });
}

std::vector<at::Tensor> stack_accumulate(const std::optional<at::Tensor>& partial, const at::Tensor& out, double eps) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() >= 1 && out.size(-1) > 0,
              "stack_accumulate: the sublayer output must be a CPU [..., d] tensor");
  at::Tensor prev = partial.has_value() ? *partial : at::Tensor();
  if (prev.defined())
    TORCH_CHECK(prev.device().is_cpu() && prev.sizes() == out.sizes() && prev.is_contiguous() &&
                    prev.scalar_type() == out.scalar_type(),
                "stack_accumulate: the partial sum must be contiguous, of the output's shape and dtype");
  const at::Tensor add = out.contiguous();  // a view for contiguous outputs (the usual case)
  auto p = new_output(out.sizes(), out.options());
  auto r = new_output(out.sizes().slice(0, out.dim() - 1), out.options().dtype(stats_type(out.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "stack_accumulate",
                                  [&] { accumulate_kernel<scalar_t>(prev, add, eps, p, r); });
  return {p, r};
}

// Push a completed block onto the stack: row `slot` of values [C, M, d] and rstd [C, M, 1] gets p
// (M * d values, any strides and floating dtype; converted to the stack's) and r (M values).
void stack_push(at::Tensor& values, at::Tensor& rstd, int64_t slot, const at::Tensor& p, const at::Tensor& r) {
  TORCH_CHECK(values.dim() == 3 && values.is_contiguous() && rstd.is_contiguous() &&
                  rstd.numel() == values.size(0) * values.size(1),
              "stack_push: values [C, M, d] and rstd [C, M, 1] must be contiguous");
  TORCH_CHECK(0 <= slot && slot < values.size(0), "stack_push: slot ", slot, " outside the stack");
  TORCH_CHECK(p.numel() == values.size(1) * values.size(2) && r.numel() == values.size(1),
              "stack_push: the block must have the stack's M * d values and M statistics");
  values.select(0, slot).view(p.sizes()).copy_(p);
  rstd.select(0, slot).view(r.sizes()).copy_(r);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused depth read forward (CPU)");
  m.def("backward", &backward, "fused depth read backward (CPU)");
  m.def("stack_phase1", &stack_phase1, "no-grad phase 1 over a stack of blocks (CPU)");
  m.def("stack_merge", &stack_merge, "no-grad phase-2 merge, optionally fused with the RMSNorm after it (CPU)");
  m.def("stack_norm", &stack_norm, "no-grad first read of a group, cast and optionally RMS-normalised (CPU)");
  m.def("stack_accumulate", &stack_accumulate, "no-grad partial sum and its statistic in one pass (CPU)");
  m.def("stack_push", &stack_push, "no-grad push of a completed block onto the stack (CPU)");
  m.def(
      "set_poison_outputs", [](bool on) { poison_outputs = on; }, "tests: fill every output with NaN first");
}
