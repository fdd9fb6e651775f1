// Weight-only INT8 / INT4 / float16 matmuls for XLA:CPU, called through the XLA FFI (glm_jax.cpu_kernels).
//
// QuantizedMatmul:     y[m, n] = (sum_j x[m, j] * q[j, n]) * scale[n], q in glm_jax's kernel layout
//                      [in * bits / 8, out] (a Linear's `qkernel`).
// QuantizedRowsMatmul: y[m, n] = (sum_j x[m, j] * q[n, j]) * scale[n], q in the official layout
//                      [out, in * bits / 8] (the quantized embedding used as the output layer).
// HalfRowsMatmul:      y[m, n] = sum_j x[m, j] * w[n, j], float16 w [out, in] (output-major kernels,
//                      the embedding), every product and sum in float32.
// INT4 packs inputs 2j (high nibble) and 2j + 1 (low nibble) into byte j of a row.
//
// Why native code: XLA:CPU's dots take float operands only, so any XLA formulation either writes a
// dequantized float copy of the weight or runs int8 shifts/conversions unvectorized; for decoding
// (a few activation rows) these loops stream the packed bytes once, converting in registers.
// Work is split into chunks shared by the caller and XLA's intra-op thread pool. The caller waits
// only for the chunks, never for pool tasks to start, so a busy pool cannot deadlock it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Nibbles in int32 arithmetic (vector shifts exist for 32-bit lanes, not for bytes).
inline float hi4(int8_t v) { return static_cast<float>(static_cast<int32_t>(v) >> 4); }
inline float lo4(int8_t v) {
  return static_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(static_cast<int32_t>(v)) << 28) >> 28);
}

// Shared by the caller and the pool tasks; outlives the call (tasks may start after it returns,
// find no chunk left and never touch `body`).
struct Chunks {
  std::function<void(int64_t chunk, int64_t worker)> body;
  int64_t count = 0;
  std::atomic<int64_t> next{0}, workers{0}, done{0};
  std::mutex mu;
  std::condition_variable finished;
};

void RunChunks(const std::shared_ptr<Chunks>& chunks) {
  int64_t chunk = chunks->next.fetch_add(1);
  if (chunk >= chunks->count) return;
  const int64_t worker = chunks->workers.fetch_add(1);
  for (; chunk < chunks->count; chunk = chunks->next.fetch_add(1)) {
    chunks->body(chunk, worker);
    if (chunks->done.fetch_add(1) + 1 == chunks->count) {
      std::lock_guard<std::mutex> lock(chunks->mu);
      chunks->finished.notify_all();
    }
  }
}

// Runs body(chunk, worker) for every chunk on the caller and up to `threads` pool threads; worker
// ids are dense from 0. Returns the number of workers that took part.
int64_t ParallelChunks(ffi::ThreadPool& pool, int64_t threads, int64_t count,
                       std::function<void(int64_t, int64_t)> body) {
  auto chunks = std::make_shared<Chunks>();
  chunks->body = std::move(body);
  chunks->count = count;
  for (int64_t t = 0; t < std::min(threads, count - 1); ++t) pool.Schedule([chunks] { RunChunks(chunks); });
  RunChunks(chunks);
  std::unique_lock<std::mutex> lock(chunks->mu);
  chunks->finished.wait(lock, [&] { return chunks->done.load() == chunks->count; });
  return chunks->workers.load();
}

int64_t PoolThreads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

// Weight rows [j0, j1) of a [k_packed, n] kernel into acc[m][n], four rows per pass so each
// accumulator is loaded and stored once per four weight rows.
void AccumulateRows(const float* x, const int8_t* q, int64_t m, int64_t k, int64_t n, int64_t bits,
                    int64_t j0, int64_t j1, float* acc) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const int8_t* w0 = q + j * n; const int8_t* w1 = w0 + n; const int8_t* w2 = w1 + n; const int8_t* w3 = w2 + n;
    for (int64_t r = 0; r < m; ++r) {
      float* a = acc + r * n;
      if (bits == 4) {
        const float* xv = x + r * k + 2 * j;
        for (int64_t c = 0; c < n; ++c) {
          a[c] += xv[0] * hi4(w0[c]) + xv[1] * lo4(w0[c]) + xv[2] * hi4(w1[c]) + xv[3] * lo4(w1[c])
                + xv[4] * hi4(w2[c]) + xv[5] * lo4(w2[c]) + xv[6] * hi4(w3[c]) + xv[7] * lo4(w3[c]);
        }
      } else {
        const float* xv = x + r * k + j;
        for (int64_t c = 0; c < n; ++c) {
          a[c] += xv[0] * static_cast<float>(w0[c]) + xv[1] * static_cast<float>(w1[c])
                + xv[2] * static_cast<float>(w2[c]) + xv[3] * static_cast<float>(w3[c]);
        }
      }
    }
  }
  for (; j < j1; ++j) {
    const int8_t* w0 = q + j * n;
    for (int64_t r = 0; r < m; ++r) {
      float* a = acc + r * n;
      const float* xr = x + r * k;
      if (bits == 4) {
        for (int64_t c = 0; c < n; ++c) a[c] += xr[2 * j] * hi4(w0[c]) + xr[2 * j + 1] * lo4(w0[c]);
      } else {
        for (int64_t c = 0; c < n; ++c) a[c] += xr[j] * static_cast<float>(w0[c]);
      }
    }
  }
}

ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                               ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("x and q must be 2-D");
  const int64_t m = xd[0], k = xd[1], k_packed = qd[0], n = qd[1];
  if (k != k_packed * (bits == 4 ? 2 : 1)) return ffi::Error::InvalidArgument("x width does not match q");
  const int64_t threads = PoolThreads(pool);
  // ~256 KiB of weight bytes per chunk, at least 4 chunks per worker, a multiple of the 4-row unroll.
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>((256 << 10) / std::max<int64_t>(1, n),
                                                        k_packed / (4 * (threads + 1)) + 1));
  rows = (rows + 3) / 4 * 4;
  const int64_t count = (k_packed + rows - 1) / rows;
  std::vector<float> partial((threads + 1) * m * n, 0.0f);  // one accumulator per worker
  const int64_t used = ParallelChunks(pool, threads, count, [&](int64_t chunk, int64_t worker) {
    AccumulateRows(x.typed_data(), q.typed_data(), m, k, n, bits, chunk * rows,
                   std::min((chunk + 1) * rows, k_packed), partial.data() + worker * m * n);
  });
  float* out = y->typed_data();
  const float* s = scale.typed_data();
  for (int64_t i = 0; i < m * n; ++i) {
    float sum = 0;
    for (int64_t w = 0; w < used; ++w) sum += partial[w * m * n + i];
    out[i] = sum * s[i % n];
  }
  return ffi::Error::Success();
}

ffi::Error QuantizedRowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("x and q must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = qd[0], width = qd[1];
  if (k != width * (bits == 4 ? 2 : 1)) return ffi::Error::InvalidArgument("x width does not match q");
  // INT4: the inputs of high and low nibbles, de-interleaved once so the row loops are contiguous.
  std::vector<float> even(m * width), odd(m * width);
  if (bits == 4) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < width; ++j) {
        even[r * width + j] = x.typed_data()[r * k + 2 * j];
        odd[r * width + j] = x.typed_data()[r * k + 2 * j + 1];
      }
  }
  const int64_t rows = 64;
  const float* s = scale.typed_data();
  float* out = y->typed_data();
  ParallelChunks(pool, PoolThreads(pool), (n + rows - 1) / rows, [&](int64_t chunk, int64_t) {
    for (int64_t o = chunk * rows; o < std::min((chunk + 1) * rows, n); ++o) {
      const int8_t* row = q.typed_data() + o * width;
      for (int64_t r = 0; r < m; ++r) {
        float sum = 0;
        if (bits == 4) {
          const float* xe = even.data() + r * width; const float* xo = odd.data() + r * width;
          for (int64_t j = 0; j < width; ++j) sum += xe[j] * hi4(row[j]) + xo[j] * lo4(row[j]);
        } else {
          const float* xr = x.typed_data() + r * k;
          for (int64_t j = 0; j < width; ++j) sum += xr[j] * static_cast<float>(row[j]);
        }
        out[r * n + o] = sum * s[o];
      }
    }
  });
  return ffi::Error::Success();
}

// IEEE half -> float (exact), for the tails and for hosts without F16C.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = sign | (exponent == 0x1fu ? 0x7f800000u : (exponent + 112) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// sum_j x[j] * w[j] over one float16 weight row: the row is read at 2 bytes per weight and widened
// in registers, four independent accumulators keep enough loads in flight to stream it.
float HalfRowDot(const float* x, const uint16_t* w, int64_t k) {
  float sum = 0.0f;
  int64_t j = 0;
#if defined(__F16C__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 32 <= k; j += 32) {
    const __m128i* h = reinterpret_cast<const __m128i*>(w + j);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_cvtph_ps(_mm_loadu_si128(h)), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_cvtph_ps(_mm_loadu_si128(h + 1)), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_cvtph_ps(_mm_loadu_si128(h + 2)), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_cvtph_ps(_mm_loadu_si128(h + 3)), a3);
  }
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  sum = _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
#endif
  for (; j < k; ++j) sum += x[j] * HalfToFloat(w[j]);
  return sum;
}

ffi::Error HalfRowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F16> w,
                              ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("x and w must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  if (wd[1] != k) return ffi::Error::InvalidArgument("x width does not match w");
  const float* xs = x.typed_data();
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* out = y->typed_data();
  const int64_t rows = 64;
  ParallelChunks(pool, PoolThreads(pool), (n + rows - 1) / rows, [&](int64_t chunk, int64_t) {
    for (int64_t o = chunk * rows; o < std::min((chunk + 1) * rows, n); ++o)
      for (int64_t r = 0; r < m; ++r) out[r * n + o] = HalfRowDot(xs + r * k, ws + o * k, k);
  });
  return ffi::Error::Success();
}

}  // namespace

#define GLM_QUANTIZED_BINDING                                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S8>>() \
      .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("bits")

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedMatmul, QuantizedMatmulImpl, GLM_QUANTIZED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedRowsMatmul, QuantizedRowsMatmulImpl, GLM_QUANTIZED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HalfRowsMatmul, HalfRowsMatmulImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>().Ret<ffi::Buffer<ffi::F32>>());
