// The Eigen thread pool the compiled code runs its matmul and conv kernels on, in the shared runtime
// library: Eigen's pool templates are about 20 KB of code, which every bucket library's shim carried
// while the pool lived there.
#define EIGEN_USE_THREADS
#include "unsupported/Eigen/CXX11/Tensor"

namespace {

struct ThreadPool {
  // No spinning: the caller blocks while the pool works, and spinning workers would take the
  // cores the caller needs for the serial parts of the computation.
  explicit ThreadPool(int threads) : pool(threads, /*allow_spinning=*/false), device(&pool, threads) {}
  Eigen::ThreadPool pool;
  Eigen::ThreadPoolDevice device;
};

}  // namespace

extern "C" {

void* kiln_thread_pool_new(int threads) { return new ThreadPool(threads); }
void kiln_thread_pool_delete(void* pool) { delete static_cast<ThreadPool*>(pool); }
// What a bucket library's kiln_set_thread_pool hands its compiled function.
const Eigen::ThreadPoolDevice* kiln_thread_pool_device(void* pool) { return &static_cast<ThreadPool*>(pool)->device; }

}  // extern "C"
