// A C face for libtorch's own distributed engine (c10d): a TCPStore
// rendezvous, then ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA), and
// the few collectives rlhf's stages use. Rust calls these through
// `stages/src/ffi.rs`; tensors travel as the `torch::Tensor*` that
// tch itself passes to libtorch.
//
// Every function catches C++ exceptions and returns their text, so a peer
// that died or a timeout becomes a Rust error, never an abort.
//
// Why this is ABI-safe although the torch wheel ships no gloo headers:
// this file includes ProcessGroupGloo.hpp for its declarations only. It
// never calls gloo and never instantiates gloo code (the build checks that
// the object has no undefined gloo symbol); ProcessGroupGloo and its
// Options hold gloo types only behind std::shared_ptr / std::unique_ptr,
// whose layout does not depend on the pointee; every function called here
// (the constructor, Options::create_default, the device factory, the
// virtual collectives) is compiled into libtorch_cpu.so against torch's
// own gloo. The gloo headers found at build time (Debian's libgloo-dev)
// only let the declarations parse.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <c10/util/Logging.h>
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>

#ifdef RLHF_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef RLHF_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char* copy_message(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

// Runs `body`; on an exception, stores its text in `*err` and returns false.
template <typename F>
bool guarded(char** err, F body) {
  try {
    body();
    return true;
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return false;
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("the collective did not finish in time");
  }
}

std::vector<at::Tensor> tensors_of(torch::Tensor** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

extern "C" {

// Which backends this build has: bit 0 Gloo, bit 1 NCCL.
int rlhf_c10d_backends() {
  int b = 0;
#ifdef RLHF_WITH_GLOO
  b |= 1;
#endif
#ifdef RLHF_WITH_NCCL
  b |= 2;
#endif
  return b;
}

// Joins the group: rank 0 hosts the TCPStore unless `store_is_external`
// (torchrun's agent store), every other rank connects to host:port.
void* rlhf_c10d_new(
    const char* backend,
    const char* host,
    int port,
    int rank,
    int world,
    int store_is_external,
    int64_t timeout_ms,
    int gloo_threads,
    char** err) {
  Group* group = nullptr;
  // While joining, c10d logs each failed connection as an error with its
  // C++ backtrace before it throws; the exception's text (without its
  // backtrace, see ffi.rs) is what rlhf reports, so only fatal messages
  // are logged meanwhile.
  struct QuietLogs {
    int was = FLAGS_caffe2_log_level;
    QuietLogs() { FLAGS_caffe2_log_level = c10::GLOG_FATAL; }
    ~QuietLogs() { FLAGS_caffe2_log_level = was; }
  } quiet;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0 && !store_is_external;
    so.numWorkers = world;
    so.waitWorkers = false;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    // One key space per group and per restart of torchrun's agent (whose
    // store outlives the ranks and keeps the last attempt's keys).
    const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
    std::string prefix = std::string("rlhf/") + (restart ? restart : "0");
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->timeout = timeout;
    std::string name(backend);
    if (name == "gloo") {
#ifdef RLHF_WITH_GLOO
      auto options = c10d::ProcessGroupGloo::Options::create_default(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && *ifname != '\0') {
        options->devices = {
            c10d::ProcessGroupGloo::createDeviceForInterface(ifname)};
      }
      options->threads = gloo_threads;
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
          store, rank, world, options);
#else
      throw std::runtime_error(
          "this rlhf was built without the Gloo backend (no gloo headers "
          "were found: install Debian's libgloo-dev, or set "
          "GLOO_INCLUDE_DIR, and rebuild)");
#endif
    } else if (name == "nccl") {
#ifdef RLHF_WITH_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          store, rank, world, options);
#else
      throw std::runtime_error(
          "this rlhf was built without the NCCL backend (nccl.h and the "
          "CUDA headers of the venv's nvidia wheels were not found)");
#endif
    } else {
      throw std::runtime_error("unknown backend " + name);
    }
    group = g.release();
  });
  return group;
}

void rlhf_c10d_free(void* g) {
  delete static_cast<Group*>(g);
}

// Sums each tensor in place across ranks.
int rlhf_c10d_allreduce_sum(void* gp, torch::Tensor** ts, int n, char** err) {
  auto g = static_cast<Group*>(gp);
  return guarded(err, [&] {
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      wait(g, g->backend->allreduce(one, opts));
    }
  });
}

// Copies `root`'s tensors into every rank's.
int rlhf_c10d_broadcast(
    void* gp, torch::Tensor** ts, int n, int root, char** err) {
  auto g = static_cast<Group*>(gp);
  return guarded(err, [&] {
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      wait(g, g->backend->broadcast(one, opts));
    }
  });
}

// Gathers one equally shaped tensor from every rank into `outs` (world of
// them, preallocated), in rank order.
int rlhf_c10d_allgather(
    void* gp, torch::Tensor* in, torch::Tensor** outs, int world, char** err) {
  auto g = static_cast<Group*>(gp);
  return guarded(err, [&] {
    std::vector<at::Tensor> input{*in};
    std::vector<std::vector<at::Tensor>> output{tensors_of(outs, world)};
    wait(g, g->backend->allgather(output, input));
  });
}

int rlhf_c10d_barrier(void* gp, char** err) {
  auto g = static_cast<Group*>(gp);
  return guarded(err, [&] {
    wait(g, g->backend->barrier());
  });
}

void rlhf_c10d_free_error(char* err) {
  std::free(err);
}

}  // extern "C"
