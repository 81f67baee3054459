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
  for (const std::string& spec : specs) {
    size_t equals = spec.find('=');
    if (spec.rfind("in:", 0) != 0 || equals == std::string::npos) continue;
    std::string name = spec.substr(3, equals - 3), file = spec.substr(equals + 1);
    int index = s.arg_index(function, name.c_str());
    if (index < 0) return Fail("no input " + name + " in " + path);
    long size = s.arg_size(function, index);
    FILE* in = std::fopen(file.c_str(), "rb");
    if (in == nullptr) return Fail("cannot open " + file);
    long got = static_cast<long>(std::fread(s.arg_data(function, index), 1, size, in));
    bool longer = std::fgetc(in) != EOF;
    std::fclose(in);
    if (got != size || longer) return Fail(file + " does not hold input " + name + "'s " + std::to_string(size) + " bytes");
  }
  if (const char* error = s.run(function)) {
    std::fprintf(stderr, "%s: %s\n", path, error);
    return 3;
  }
  for (const std::string& spec : specs) {
    size_t equals = spec.find('=');
    if (spec.rfind("out:", 0) != 0 || equals == std::string::npos) continue;
    std::string name = spec.substr(4, equals - 4), file = spec.substr(equals + 1);
    int index = s.result_index(function, name.c_str());
    if (index < 0) return Fail("no output " + name + " in " + path);
    FILE* out = std::fopen(file.c_str(), "wb");
    long size = s.result_size(function, index);
    if (out == nullptr || std::fwrite(s.result_data(function, index), 1, size, out) != static_cast<size_t>(size)) {
      return Fail("cannot write " + file);
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
