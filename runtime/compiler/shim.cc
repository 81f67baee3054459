// A C ABI over one tfcompile-generated class, so the thin runtime can drive it through ctypes.
// Built by runtime/compiler/toolchain.py with -DKILN_HEADER="..." -DKILN_CLASS=... per bucket, small
// (-Os, no assertions): it runs once per call, and every bucket library carries a copy.
#include <string>

#include KILN_HEADER

// The thread pool lives in the shared runtime library (kernels/thread_pool.cc).
extern "C" const Eigen::ThreadPoolDevice* kiln_thread_pool_device(void* pool);

namespace {

KILN_CLASS* As(void* function) { return static_cast<KILN_CLASS*>(function); }

// tfcompile names a signature's input "feed_<key>" and its output "fetch_<key>", '/' replaced by '_'.
std::string Mangle(const char* prefix, const char* key) {
  std::string name = std::string(prefix) + key;
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  return name;
}

}  // namespace

extern "C" {

void* kiln_new() { return new KILN_CLASS(); }
void kiln_delete(void* function) { delete As(function); }
int kiln_num_args(void* function) { return As(function)->num_args(); }
int kiln_num_results(void* function) { return As(function)->num_results(); }
int kiln_arg_index(void* function, const char* key) {
  return As(function)->LookupArgIndex(Mangle("feed_", key));
}
int kiln_result_index(void* function, const char* key) {
  return As(function)->LookupResultIndex(Mangle("fetch_", key));
}
long kiln_arg_size(void* function, int index) { return As(function)->arg_size(index); }
long kiln_result_size(void* function, int index) { return As(function)->result_size(index); }
void* kiln_arg_data(void* function, int index) { return As(function)->arg_data(index); }
void* kiln_result_data(void* function, int index) { return As(function)->result_data(index); }
// Points argument `index` at `data` instead of the instance's own buffer, so a large input is
// passed without a copy. The generated code only reads arguments; `data` must be aligned to
// xla::cpu::MinAlign() and stay valid until the argument is pointed elsewhere.
void kiln_set_arg_data(void* function, int index, const void* data) {
  As(function)->set_arg_data(index, data);
}

// Returns nullptr on success, else the compiled code's error message (valid until the next run).
const char* kiln_run(void* function) {
  static thread_local std::string error;
  if (As(function)->Run()) return nullptr;
  error = As(function)->error_msg();
  if (error.empty()) error = "the compiled function reported a failure";
  return error.c_str();
}

// `pool` comes from the runtime library's kiln_thread_pool_new.
void kiln_set_thread_pool(void* function, void* pool) {
  As(function)->set_thread_pool(pool ? kiln_thread_pool_device(pool) : nullptr);
}

}  // extern "C"
