// Decode attention straight from the paged KV pools (CPU, fp32 or bf16): one query token per request, its keys
// and values read in place through its slots, no gathered copy. Built on first use by cpu_kernel.py.
//
//   q [N, H, D] (last dim contiguous), k_pool / v_pool [S, H_kv, D] contiguous, all three of one dtype (fp32 or
//   bf16), q_row [B] (row of each request's query in q), slots [B, K] (pool slot of each key position), lengths
//   [B] (keys the request sees: 0 .. lengths[b] - 1; the rest of its row is padding), window (0: none; else the
//   last `window` keys only)  ->  out [B, H, D] (q's dtype) = softmax(q k^T * scale) v per (request, head),
//   GQA: head h reads K/V head h / (H / H_kv).
// Same arithmetic as attention.py's torch path (max-subtracted softmax in fp32; bf16 inputs are widened to fp32
// and scores, softmax and the weighted sum stay in fp32, rounded to bf16 once at the end, as SDPA's CPU kernel
// does); summation order differs, so results agree to float rounding, not bit for bit. Work is split over
// requests (or request and K/V head) with ATen's parallel_for (torch's own OpenMP threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

// n values at src as fp32: src itself for fp32, else widened into buf (which must hold n).
template <typename T>
static inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<float>(src[e]);
    return buf;
  }
}

template <typename T>
static void decode(const T* qp, const T* kp, const T* vp, const int64_t* rp, const int64_t* sp, const int64_t* lp,
                   T* op, int64_t B, int64_t K, int64_t H, int64_t D, int64_t Hkv, int64_t qs0, int64_t qs1,
                   float fscale, int64_t window) {
  const int64_t G = H / Hkv, row = Hkv * D;
  // A task is one request with all its heads (each key's K/V row, H_kv * D values, read whole and in order:
  // measured 15-20 % faster than one task per K/V head), or one (request, K/V head) pair when there are too
  // few requests to keep every thread busy.
  const int64_t per_request = Hkv == 1 || B >= 2 * at::get_num_threads() ? Hkv : 1;
  at::parallel_for(0, B * (Hkv / per_request), 1, [&](int64_t begin, int64_t end) {
    const int64_t heads = per_request * G;
    std::vector<float> scores(heads * K), query(heads * D), acc(heads * D), widened(per_request * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv / per_request), h0 = (task % (Hkv / per_request)) * per_request;
      // query heads h0 * G .. h0 * G + heads - 1
      const int64_t len = std::min(lp[b], K);
      const int64_t lo = (window > 0 && len > window) ? len - window : 0;
      T* ob = op + (b * H + h0 * G) * D;
      for (int64_t i = 0; i < heads * D; ++i) acc[i] = 0.f;
      if (len > lo) {                                             // else no keys: zeros (never a real decode)
        const T* qb = qp + rp[b] * qs0 + h0 * G * qs1;
        for (int64_t i = 0; i < heads; ++i)
          for (int64_t d = 0; d < D; ++d) query[i * D + d] = static_cast<float>(qb[i * qs1 + d]);
        const int64_t* sb = sp + b * K;
        for (int64_t j = lo; j < len; ++j) {                      // scores: each key row read once for all heads
          const float* kr = as_float(kp + sb[j] * row + h0 * D, per_request * D, widened.data());
          for (int64_t i = 0; i < heads; ++i) {
            const float* qi = query.data() + i * D;
            const float* ki = kr + (i / G) * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * ki[d];
            scores[i * K + j] = dot * fscale;
          }
        }
        for (int64_t i = 0; i < heads; ++i) {                     // softmax over lo .. len - 1
          float* s = scores.data() + i * K;
          float m = -INFINITY;
          for (int64_t j = lo; j < len; ++j) m = s[j] > m ? s[j] : m;
          float sum = 0.f;
          for (int64_t j = lo; j < len; ++j) {
            s[j] = std::exp(s[j] - m);
            sum += s[j];
          }
          const float inv = 1.f / sum;
          for (int64_t j = lo; j < len; ++j) s[j] *= inv;
        }
        for (int64_t j = lo; j < len; ++j) {                      // weighted sum: each value row read once
          const float* vr = as_float(vp + sb[j] * row + h0 * D, per_request * D, widened.data());
          for (int64_t i = 0; i < heads; ++i) {
            const float p = scores[i * K + j];
            const float* vi = vr + (i / G) * D;
            float* oi = acc.data() + i * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) oi[d] += p * vi[d];
          }
        }
      }
      for (int64_t i = 0; i < heads * D; ++i) ob[i] = static_cast<T>(acc[i]);
    }
  });
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                               const torch::Tensor& q_row, const torch::Tensor& slots, const torch::Tensor& lengths,
                               double scale, int64_t window) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.dim() == 3 && (dtype == torch::kFloat || dtype == torch::kBFloat16) && q.stride(2) == 1,
              "q must be fp32 or bf16 [N, H, D], last dim contiguous");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == dtype &&
              v_pool.scalar_type() == dtype && k_pool.sizes() == v_pool.sizes(),
              "pools must be contiguous [S, H_kv, D] of q's dtype");
  TORCH_CHECK(slots.is_contiguous() && q_row.is_contiguous() && lengths.is_contiguous() &&
              slots.scalar_type() == torch::kLong && q_row.scalar_type() == torch::kLong &&
              lengths.scalar_type() == torch::kLong, "q_row, slots and lengths must be contiguous int64");
  const int64_t B = slots.size(0), K = slots.size(1), H = q.size(1), D = q.size(2), Hkv = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == D && H % Hkv == 0 && q_row.size(0) == B && lengths.size(0) == B, "shape mismatch");
  auto out = torch::empty({B, H, D}, q.options().memory_format(torch::MemoryFormat::Contiguous));
  const float fscale = static_cast<float>(scale);
  const int64_t* rp = q_row.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  if (dtype == torch::kFloat) {
    decode<float>(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), rp, sp, lp,
                  out.data_ptr<float>(), B, K, H, D, Hkv, q.stride(0), q.stride(1), fscale, window);
  } else {
    decode<at::BFloat16>(q.data_ptr<at::BFloat16>(), k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(),
                         rp, sp, lp, out.data_ptr<at::BFloat16>(), B, K, H, D, Hkv, q.stride(0), q.stride(1),
                         fscale, window);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU, fp32 or bf16)");
}
