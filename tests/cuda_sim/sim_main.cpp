// Driver of the host simulation: runs one call of csrc/ptv2_api.h on tensors read from files (tests only).
//
//   ptv2_sim DIR      reads DIR/problem.txt, runs it, writes the output tensors back to their files.
//
// problem.txt lines:
//   op forward | backward | dropout_mask | host_dropout_mask
//   scalar NAME VALUE
//   tensor NAME DTYPE DIM SIZE... STRIDE... SPAN PATH [out]
// A tensor's file holds SPAN elements: its storage from element 0 of the view to its last element. Each tensor
// gets its own allocation that ends just before an inaccessible page, so reading past its end crashes; the
// workspace is filled with NaN bytes first.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include "ptv2_api.h"
#include "ptv2_sim.h"

namespace {

struct Tensor {
  ptv2::TensorRef ref;
  std::unique_ptr<ptv2_sim::GuardedBuffer> memory;
  size_t bytes = 0;
  std::string path;
  bool output = false;
};

int element_size(int dtype) {
  switch (dtype) {
    case ptv2::kFloat16:
    case ptv2::kBFloat16: return 2;
    case ptv2::kFloat32:
    case ptv2::kInt32: return 4;
    case ptv2::kInt64: return 8;
    default: return 1;
  }
}

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "ptv2_sim: %s\n", message.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: ptv2_sim DIR");
  const std::string dir = argv[1];
  std::ifstream problem_file(dir + "/problem.txt");
  if (!problem_file) die("cannot read " + dir + "/problem.txt");
  std::string op;
  std::map<std::string, double> scalars;
  std::map<std::string, Tensor> tensors;
  std::string line;
  while (std::getline(problem_file, line)) {
    std::istringstream in(line);
    std::string kind;
    if (!(in >> kind)) continue;
    if (kind == "op") {
      in >> op;
    } else if (kind == "scalar") {
      std::string name;
      double value;
      in >> name >> value;
      scalars[name] = value;
    } else if (kind == "tensor") {
      std::string name, flag;
      Tensor t;
      int64_t span = 0;
      in >> name >> t.ref.dtype >> t.ref.dim;
      for (int i = 0; i < t.ref.dim; ++i) in >> t.ref.size[i];
      for (int i = 0; i < t.ref.dim; ++i) in >> t.ref.stride[i];
      in >> span >> t.path;
      t.output = static_cast<bool>(in >> flag) && flag == "out";
      t.ref.defined = true;
      t.bytes = static_cast<size_t>(span) * element_size(t.ref.dtype);
      t.memory = std::make_unique<ptv2_sim::GuardedBuffer>(t.bytes > 0 ? t.bytes : 1);
      t.ref.data = t.memory->data;
      std::ifstream data(dir + "/" + t.path, std::ios::binary);
      if (!data) die("cannot read " + t.path);
      data.read(reinterpret_cast<char*>(t.memory->data), static_cast<std::streamsize>(t.bytes));
      if (static_cast<size_t>(data.gcount()) != t.bytes) die("short file " + t.path);
      tensors[name] = std::move(t);
    } else {
      die("bad line: " + line);
    }
  }
  auto tensor = [&](const std::string& name) {
    auto it = tensors.find(name);
    return it == tensors.end() ? ptv2::TensorRef{} : it->second.ref;
  };
  auto scalar = [&](const std::string& name, double fallback) {
    auto it = scalars.find(name);
    return it == scalars.end() ? fallback : it->second;
  };

  ptv2::AttentionProblem problem;
  problem.q = tensor("q"), problem.k = tensor("k"), problem.v = tensor("v");
  problem.prefix_k = tensor("prefix_k"), problem.prefix_v = tensor("prefix_v");
  problem.prefix_index = tensor("prefix_index"), problem.prefix_lengths = tensor("prefix_lengths");
  problem.attn_mask = tensor("attn_mask"), problem.seed = tensor("seed");
  problem.causal = scalar("causal", 0) != 0;
  problem.scale = scalar("scale", 1.0);
  problem.dropout_p = scalar("dropout_p", 0.0);
  ptv2::DeviceInfo device;
  device.num_sms = static_cast<int>(scalar("num_sms", 4));
  device.max_shared_memory = static_cast<int>(scalar("max_shared_memory", 227 * 1024));

  std::string error;
  std::unique_ptr<ptv2_sim::GuardedBuffer> workspace;
  auto make_workspace = [&](size_t bytes) {
    workspace = std::make_unique<ptv2_sim::GuardedBuffer>(bytes > 0 ? bytes : 1);
    std::memset(workspace->data, 0xff, bytes);
    return static_cast<void*>(workspace->data);
  };
  if (op == "forward") {
    ptv2::ForwardOutputs outputs{tensor("out"), tensor("lse")};
    const auto algo = static_cast<ptv2::ForwardAlgo>(static_cast<int>(scalar("algo", 0)));
    const size_t bytes = ptv2::forward_workspace_bytes(problem, algo, device);
    error = ptv2::run_forward(problem, outputs, algo, make_workspace(bytes), bytes, device, nullptr);
  } else if (op == "backward") {
    ptv2::BackwardInputs inputs;
    inputs.grad_out = tensor("grad_out"), inputs.grad_lse = tensor("grad_lse");
    inputs.out = tensor("out"), inputs.lse = tensor("lse");
    inputs.deterministic = scalar("deterministic", 0) != 0;
    ptv2::BackwardOutputs outputs{tensor("dq"), tensor("dk"), tensor("dv"), tensor("dprefix_k"), tensor("dprefix_v")};
    const size_t bytes = ptv2::backward_workspace_bytes(problem, inputs);
    error = ptv2::run_backward(problem, inputs, outputs, make_workspace(bytes), bytes, device, nullptr);
  } else if (op == "dropout_mask" || op == "host_dropout_mask") {
    const ptv2::TensorRef keep = tensor("keep");
    const int64_t batch = static_cast<int64_t>(scalar("batch", 0)), heads = static_cast<int64_t>(scalar("q_heads", 0));
    const int64_t q_len = static_cast<int64_t>(scalar("q_len", 0)), cols = static_cast<int64_t>(scalar("cols", 0));
    const double p = scalar("dropout_p", 0.0);
    if (op == "dropout_mask") {
      error = ptv2::run_dropout_mask(static_cast<uint8_t*>(keep.data), static_cast<const int64_t*>(problem.seed.data),
                                     batch, heads, q_len, cols, p, nullptr);
    } else {
      ptv2::host_dropout_mask(static_cast<uint8_t*>(keep.data),
                              static_cast<uint64_t>(*static_cast<const int64_t*>(problem.seed.data)), batch, heads,
                              q_len, cols, p);
    }
  } else {
    die("unknown op " + op);
  }
  if (!error.empty()) die(error);

  for (auto& [name, t] : tensors) {
    if (!t.output) continue;
    std::ofstream data(dir + "/" + t.path, std::ios::binary | std::ios::trunc);
    data.write(reinterpret_cast<const char*>(t.memory->data), static_cast<std::streamsize>(t.bytes));
  }
  std::printf("ok max_shared_memory=%zu\n", ptv2_sim::max_shared_memory_seen());
  return 0;
}
