// Weight-only INT8 / INT4 matmul for XLA:CPU, called through the XLA FFI (glm_jax.cpu_kernels).
//
// y[m, n] = (sum_j x[m, j] * q[j, n]) * scale[n] with q in glm_jax's packed kernel layout
// [in * bits / 8, out] (INT4: packed row j holds input 2j in the high nibble, 2j + 1 in the low).
// Why native code: XLA:CPU's dots take float operands only, so any XLA formulation either writes a
// dequantized float copy of the weight or runs int8 shifts/conversions unvectorized; for decoding
// (a few activation rows) this loop streams the packed bytes once, converting in registers.
// Work is split into chunks of weight rows shared by the caller and XLA's intra-op thread pool;
// every worker sums into its own accumulator, reduced at the end. The caller waits only for the
// chunks, never for pool tasks to start, so a busy pool cannot deadlock it.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Job {
  const float* x; const int8_t* q; const float* scale; float* y;
  int64_t m, k_packed, n, bits, rows_per_chunk, chunks;
  std::vector<float> partial;  // [workers, m, n]
  std::atomic<int64_t> next_chunk{0}, next_worker{0}, done_chunks{0};
  std::mutex mu; std::condition_variable cv;
};

// Weight value `c` of a packed row: INT8 as is; INT4 high nibble (even input) / low nibble (odd input).
inline float hi4(int8_t v) { return static_cast<float>(v >> 4); }
inline float lo4(int8_t v) { return static_cast<float>(static_cast<int8_t>(v << 4) >> 4); }

// Rows [j0, j1) of the packed weight into acc[m][n], four rows per pass so each accumulator is
// loaded and stored once per four weight rows.
inline void accumulate(const Job& job, int64_t j0, int64_t j1, float* acc) {
  const int64_t n = job.n, k = job.k_packed * (job.bits == 4 ? 2 : 1);
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const int8_t* w0 = job.q + j * n; const int8_t* w1 = w0 + n; const int8_t* w2 = w1 + n; const int8_t* w3 = w2 + n;
    for (int64_t r = 0; r < job.m; ++r) {
      float* a = acc + r * n;
      const float* xr = job.x + r * k;
      if (job.bits == 4) {
        const float* xv = xr + 2 * j;
        for (int64_t c = 0; c < n; ++c) {
          a[c] += xv[0] * hi4(w0[c]) + xv[1] * lo4(w0[c]) + xv[2] * hi4(w1[c]) + xv[3] * lo4(w1[c])
                + xv[4] * hi4(w2[c]) + xv[5] * lo4(w2[c]) + xv[6] * hi4(w3[c]) + xv[7] * lo4(w3[c]);
        }
      } else {
        const float* xv = xr + j;
        for (int64_t c = 0; c < n; ++c) {
          a[c] += xv[0] * static_cast<float>(w0[c]) + xv[1] * static_cast<float>(w1[c])
                + xv[2] * static_cast<float>(w2[c]) + xv[3] * static_cast<float>(w3[c]);
        }
      }
    }
  }
  for (; j < j1; ++j) {
    const int8_t* w0 = job.q + j * n;
    for (int64_t r = 0; r < job.m; ++r) {
      float* a = acc + r * n;
      const float* xr = job.x + r * k;
      if (job.bits == 4) {
        for (int64_t c = 0; c < n; ++c) a[c] += xr[2 * j] * hi4(w0[c]) + xr[2 * j + 1] * lo4(w0[c]);
      } else {
        for (int64_t c = 0; c < n; ++c) a[c] += xr[j] * static_cast<float>(w0[c]);
      }
    }
  }
}

void work(const std::shared_ptr<Job>& job) {
  int64_t chunk = job->next_chunk.fetch_add(1);
  if (chunk >= job->chunks) return;
  const int64_t worker = job->next_worker.fetch_add(1);
  float* acc = job->partial.data() + worker * job->m * job->n;
  for (; chunk < job->chunks; chunk = job->next_chunk.fetch_add(1)) {
    const int64_t j0 = chunk * job->rows_per_chunk;
    accumulate(*job, j0, std::min(j0 + job->rows_per_chunk, job->k_packed), acc);
    if (job->done_chunks.fetch_add(1) + 1 == job->chunks) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->cv.notify_all();
    }
  }
}

ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                               ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  auto xd = x.dimensions(); auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("x and q must be 2-D");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data(); job->q = q.typed_data(); job->scale = scale.typed_data(); job->y = y->typed_data();
  job->m = xd[0]; job->k_packed = qd[0]; job->n = qd[1]; job->bits = bits;
  if (xd[1] != job->k_packed * (bits == 4 ? 2 : 1)) return ffi::Error::InvalidArgument("x width does not match q");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t workers = threads + 1;
  // ~256 KiB of weight bytes per chunk, at least 4 chunks per worker for balance.
  job->rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>((256 << 10) / std::max<int64_t>(1, job->n),
                                                              job->k_packed / (4 * workers) + 1));
  job->rows_per_chunk = (job->rows_per_chunk + 3) / 4 * 4;
  job->chunks = (job->k_packed + job->rows_per_chunk - 1) / job->rows_per_chunk;
  job->partial.assign(workers * job->m * job->n, 0.0f);
  for (int64_t t = 0; t < threads; ++t) pool.Schedule([job] { work(job); });
  work(job);
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->done_chunks.load() == job->chunks; });
  }
  const int64_t used = job->next_worker.load();
  const int64_t size = job->m * job->n;
  float* out = job->y;
  for (int64_t i = 0; i < size; ++i) {
    float s = 0;
    for (int64_t w = 0; w < used; ++w) s += job->partial[w * size + i];
    out[i] = s * job->scale[i % job->n];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    QuantizedMatmul, QuantizedMatmulImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S8>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("bits"));
