// Runs bucket libraries of a Kiln servable through their kiln_* functions (shim.cc) without Python:
// how a build for another architecture is run under QEMU user-mode emulation (emulate.py).
//
//   kiln_harness LIB in:NAME=FILE... out:NAME=FILE... [-- LIB ...]
//
// For each LIB: one instance, each input read from FILE (exactly the argument's size), one run on the
// calling thread, each output written to FILE. Exit status 2: a bad command or file, 3: a failed run.
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Shim {
  void* (*make)();
  void (*destroy)(void*);
  int (*arg_index)(void*, const char*);
  int (*result_index)(void*, const char*);
  long (*arg_size)(void*, int);
  long (*result_size)(void*, int);
  void* (*arg_data)(void*, int);
  void* (*result_data)(void*, int);
  const char* (*run)(void*);
};

template <typename F>
bool Bind(void* lib, const char* name, F* function) {
  *function = reinterpret_cast<F>(dlsym(lib, name));
  if (*function == nullptr) std::fprintf(stderr, "the library lacks %s\n", name);
  return *function != nullptr;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  return 2;
}

// One in:NAME=FILE or out:NAME=FILE argument, with the index of its tensor in the library.
struct Tensor {
  std::string name, file;
  int index;
};

// The arguments of `specs` with `prefix` ("in:" or "out:"), each found by `index_of`; false after
// reporting one the library lacks.
bool Find(const std::vector<std::string>& specs, const std::string& prefix, int (*index_of)(void*, const char*),
          void* function, const char* path, std::vector<Tensor>* found) {
  for (const std::string& spec : specs) {
    size_t equals = spec.find('=');
    if (spec.rfind(prefix, 0) != 0 || equals == std::string::npos) continue;
    Tensor tensor{spec.substr(prefix.size(), equals - prefix.size()), spec.substr(equals + 1), -1};
    tensor.index = index_of(function, tensor.name.c_str());
    if (tensor.index < 0) {
      std::fprintf(stderr, "no %s %s in %s\n", prefix == "in:" ? "input" : "output", tensor.name.c_str(), path);
      return false;
    }
    found->push_back(tensor);
  }
  return true;
}

// Runs one library with its in:/out: arguments.
int RunOne(const char* path, const std::vector<std::string>& specs) {
  void* lib = dlopen(path, RTLD_NOW);
  if (lib == nullptr) return Fail(dlerror());
  Shim s;
  if (!Bind(lib, "kiln_new", &s.make) || !Bind(lib, "kiln_delete", &s.destroy) ||
      !Bind(lib, "kiln_arg_index", &s.arg_index) || !Bind(lib, "kiln_result_index", &s.result_index) ||
      !Bind(lib, "kiln_arg_size", &s.arg_size) || !Bind(lib, "kiln_result_size", &s.result_size) ||
      !Bind(lib, "kiln_arg_data", &s.arg_data) || !Bind(lib, "kiln_result_data", &s.result_data) ||
      !Bind(lib, "kiln_run", &s.run)) {
    return 2;
  }
  void* function = s.make();
  std::vector<Tensor> inputs, outputs;
  if (!Find(specs, "in:", s.arg_index, function, path, &inputs) ||
      !Find(specs, "out:", s.result_index, function, path, &outputs)) {
    return 2;
  }
  for (const Tensor& input : inputs) {
    long size = s.arg_size(function, input.index);
    FILE* in = std::fopen(input.file.c_str(), "rb");
    if (in == nullptr) return Fail("cannot open " + input.file);
    long got = static_cast<long>(std::fread(s.arg_data(function, input.index), 1, size, in));
    bool longer = std::fgetc(in) != EOF;
    std::fclose(in);
    if (got != size || longer) {
      return Fail(input.file + " does not hold input " + input.name + "'s " + std::to_string(size) + " bytes");
    }
  }
  if (const char* error = s.run(function)) {
    std::fprintf(stderr, "%s: %s\n", path, error);
    return 3;
  }
  for (const Tensor& output : outputs) {
    FILE* out = std::fopen(output.file.c_str(), "wb");
    long size = s.result_size(function, output.index);
    if (out == nullptr ||
        std::fwrite(s.result_data(function, output.index), 1, size, out) != static_cast<size_t>(size)) {
      return Fail("cannot write " + output.file);
    }
    std::fclose(out);
  }
  s.destroy(function);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc;) {
    const char* path = argv[i++];
    std::vector<std::string> specs;
    while (i < argc && std::strcmp(argv[i], "--") != 0) specs.emplace_back(argv[i++]);
    i++;  // past "--"
    if (int status = RunOne(path, specs)) return status;
  }
  return 0;
}
