"""Stream ordering of csrc/sampa_fused_cuda.cu, checked without a GPU.

The .cu uses only the CUDA runtime API, so it is compiled with nvcc (compile
only) and linked against a stub runtime written here, which runs nothing but
models what the GPU may do: each stream is a sequence of operations, an event
record captures the stream's position, a wait orders the waiting stream's later
operations after that position (vector clocks; a wait on a never-recorded
event orders nothing, as in CUDA). Handle 0 is the legacy default stream of the
current device; the other streams are non-blocking (as torch's side streams
are), so nothing orders them with the default stream but events. Every
operation says which bytes it reads or writes; two conflicting accesses (one a
write) that happens-before does not order are reported as a race, naming both
operations and their streams.

A driver (also below; plain C++ calling the sampa_cuda API of
csrc/sampa_fused.h) runs the peer engine's pattern on one link, three steps:

    reader reads dst;  begin(reader)
    per bucket: producer writes src[a, b);  copy(dst, src, a, b, producer)
    finish(consumer, owner);  consumer reads dst;  owner overwrites src

in every mode (device-to-device, peer, staged with several slots and chunks per
copy, staged without peer access) and with the default (null) stream in each
role, for the link's own streams and with side streams everywhere. Besides "no
race", each run checks that each required ordering (producer -> copy, copy ->
consumer, copy -> owner, reader -> copy, and the staged halves) was actually
exercised, that the link's mode is the expected one, and that every call puts
the caller's current device back.

    python tests/test_cuda_ordering.py [some.cu]

builds the driver against another version of the .cu (e.g. `git show
main:csrc/sampa_fused_cuda.cu > /tmp/old.cu`) and prints every run's report.
SAMPA_ORDERING_MUTANTS=1 also runs test_every_wait_and_record_is_needed, which
deletes each cudaStreamWaitEvent / cudaEventRecord of the .cu in turn and
checks that some run then fails (about a minute: one nvcc per mutant).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU = CSRC / "sampa_fused_cuda.cu"

MODES = ["device", "peer", "peer-reverse", "staged", "fallback", "staged-same"]
# Which streams are the default (null) stream; the others are side streams.
ROLES = ["side", "null-reader", "null-producer", "null-consumer", "null-owner", "null-roles",
         "null-link", "null-roles,null-link", "shared", "shared,null-link"]

STUB_H = r'''
// Test-only interface of the stub CUDA runtime (tests/test_cuda_ordering.py).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <map>
#include <string>
#include <vector>

namespace stub {
// Forget every stream, event, buffer and finding: `devices` devices, with or
// without peer access between them; the current device becomes 0.
void reset(int devices, bool peer_access);
// A non-blocking stream on `device` (like torch's side streams).
cudaStream_t stream(int device, const char* name);
// Memory that the stub takes for device memory of `device`.
void* device_buffer(int device, size_t bytes, const char* name);
// A kernel on s (nullptr: the current device's default stream) that reads or
// writes [p, p + bytes); `kind` is its role in the ordered-pair counts.
void kernel(cudaStream_t s, const char* kind, const std::string& label, const void* p,
            size_t bytes, bool write);
// Races (conflicting accesses not ordered by happens-before) and misuse.
const std::vector<std::string>& violations();
// "kind -> kind": conflicting pairs of operations that were found ordered.
const std::map<std::string, long>& ordered_pairs();
// The name of the stream of the last operation.
std::string last_op_stream();
}  // namespace stub
'''

STUB_CPP = r'''
// A stub CUDA runtime that executes nothing and checks stream ordering with
// vector clocks. Streams 0..devices-1 are the legacy default streams.
#include "stub_cudart.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <utility>

struct CUstream_st { int index; };
struct CUevent_st {
  int device;
  bool recorded;
  bool destroyed;
  std::vector<uint64_t> vc;
};

namespace {

using VC = std::vector<uint64_t>;

uint64_t at(const VC& v, size_t i) { return i < v.size() ? v[i] : 0; }

void join(VC& a, const VC& b) {
  if (a.size() < b.size()) a.resize(b.size(), 0);
  for (size_t i = 0; i < b.size(); ++i) a[i] = std::max(a[i], b[i]);
}

struct Stream { int device; std::string name; VC vc; };
struct Alloc { const char* base; size_t bytes; int device; std::string name; bool freed; };
struct Access { int alloc; size_t lo, hi; bool write; };
struct Op {
  int id;
  int stream;
  uint64_t seq;  // its position on its stream
  VC vc;         // what it is ordered after
  std::string kind, label;
  std::vector<Access> acc;
};

struct State {
  int devices = 1;
  bool peer = false;
  int current = 0;
  cudaError_t last = cudaSuccess;
  std::vector<Stream> streams;
  std::vector<Alloc> allocs;  // device -1: pinned host memory
  std::vector<Op> ops;
  VC host;  // what the host thread has synchronised with
  std::set<std::pair<int, int>> enabled;
  std::vector<std::string> violations;
  std::map<std::string, long> pairs;
  int host_blocks = 0;
};

State& S() {
  static State* s = nullptr;
  if (!s) {
    s = new State;
    s->streams.push_back({0, "the default stream (null) of cuda:0", {}});
  }
  return *s;
}

cudaError_t ret(cudaError_t e) {
  if (e != cudaSuccess) S().last = e;
  return e;
}

void violation(const std::string& what) { S().violations.push_back(what); }

// The stream index of a handle, -1 if invalid.
int resolve(cudaStream_t s, const char* api) {
  if (s == nullptr || s == cudaStreamLegacy) return S().current;
  if (s == cudaStreamPerThread) {
    violation(std::string(api) + ": the per-thread default stream is not modelled");
    return -1;
  }
  const int i = s->index;
  if (i < 0 || i >= static_cast<int>(S().streams.size())) {
    violation(std::string(api) + ": unknown stream handle");
    return -1;
  }
  return i;
}

int find(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (size_t i = 0; i < S().allocs.size(); ++i) {
    const Alloc& a = S().allocs[i];
    if (!a.freed && c >= a.base && c + n <= a.base + a.bytes) return static_cast<int>(i);
  }
  return -1;
}

std::string region(int alloc, size_t lo, size_t hi) {
  return S().allocs[alloc].name + "[" + std::to_string(lo) + ", " + std::to_string(hi) + ")";
}

std::string describe(const Op& op) {
  return "op #" + std::to_string(op.id) + " '" + op.label + "' on " + S().streams[op.stream].name;
}

void add_op(int s, const std::string& kind, const std::string& label,
            const std::vector<Access>& acc) {
  State& st = S();
  Stream& str = st.streams[s];
  join(str.vc, st.host);  // enqueued after whatever the host waited for
  if (str.vc.size() <= static_cast<size_t>(s)) str.vc.resize(s + 1, 0);
  Op op;
  op.id = static_cast<int>(st.ops.size());
  op.stream = s;
  op.seq = ++str.vc[s];
  op.vc = str.vc;
  op.kind = kind;
  op.label = label;
  op.acc = acc;
  for (const Op& prev : st.ops) {
    for (const Access& pa : prev.acc) {
      for (const Access& a : op.acc) {
        if (pa.alloc != a.alloc || pa.hi <= a.lo || a.hi <= pa.lo || !(pa.write || a.write)) {
          continue;
        }
        if (at(op.vc, prev.stream) >= prev.seq) {
          st.pairs[prev.kind + " -> " + op.kind]++;
          continue;
        }
        violation("RACE on " + region(a.alloc, std::max(a.lo, pa.lo), std::min(a.hi, pa.hi)) +
                  ": " + describe(op) + (a.write ? " writes" : " reads") +
                  " it, but is not ordered after " + describe(prev) + ", which " +
                  (pa.write ? "writes" : "reads") + " it");
      }
    }
  }
  st.ops.push_back(op);
}

bool access(const void* p, size_t n, bool write, const std::string& api, Access* out, int* device) {
  const int i = find(p, n);
  if (i < 0) {
    violation(api + ": " + std::to_string(n) + " bytes at an address that is no live buffer");
    return false;
  }
  const size_t lo = static_cast<size_t>(static_cast<const char*>(p) - S().allocs[i].base);
  *out = {i, lo, lo + n, write};
  *device = S().allocs[i].device;
  return true;
}

bool valid_event(cudaEvent_t ev) { return ev != nullptr && !ev->destroyed; }

}  // namespace

namespace stub {

void reset(int devices, bool peer_access) {
  State& st = S();
  st = State();
  st.devices = devices;
  st.peer = peer_access;
  for (int d = 0; d < devices; ++d) {
    st.streams.push_back({d, "the default stream (null) of cuda:" + std::to_string(d), {}});
  }
}

cudaStream_t stream(int device, const char* name) {
  State& st = S();
  st.streams.push_back({device, std::string("stream '") + name + "' of cuda:" +
                                    std::to_string(device), {}});
  return new CUstream_st{static_cast<int>(st.streams.size()) - 1};
}

void* device_buffer(int device, size_t bytes, const char* name) {
  char* p = static_cast<char*>(std::calloc(bytes, 1));
  S().allocs.push_back({p, bytes, device, std::string(name) + " (cuda:" + std::to_string(device) +
                                              ")", false});
  return p;
}

void kernel(cudaStream_t s, const char* kind, const std::string& label, const void* p,
            size_t bytes, bool write) {
  const int i = resolve(s, "kernel");
  Access a;
  int device;
  if (i < 0 || !access(p, bytes, write, "kernel '" + label + "'", &a, &device)) return;
  if (device != S().streams[i].device) {
    violation("kernel '" + label + "' on " + S().streams[i].name + " touches memory of cuda:" +
              std::to_string(device));
  }
  add_op(i, kind, label, {a});
}

const std::vector<std::string>& violations() { return S().violations; }
const std::map<std::string, long>& ordered_pairs() { return S().pairs; }
std::string last_op_stream() {
  return S().ops.empty() ? "(none)" : S().streams[S().ops.back().stream].name;
}

}  // namespace stub

namespace {

cudaError_t copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s,
                 int dst_device, int src_device, const char* api) {
  static const char* kinds[] = {"H2H", "H2D", "D2H", "D2D", "default"};
  const int i = resolve(s, api);
  if (i < 0) return ret(cudaErrorInvalidResourceHandle);
  if (n == 0) return cudaSuccess;
  Access r, w;
  int rd, wd;
  if (!access(src, n, false, api, &r, &rd) || !access(dst, n, true, api, &w, &wd)) {
    return ret(cudaErrorInvalidValue);
  }
  const int want_src = kind == cudaMemcpyHostToDevice ? -1 : src_device;
  const int want_dst = kind == cudaMemcpyDeviceToHost ? -1 : dst_device;
  // Peer copies name both devices; plain device-to-device copies take any.
  if ((want_src == -1) != (rd == -1) || (want_dst == -1) != (wd == -1) ||
      (want_src >= 0 && src_device >= 0 && rd != want_src) ||
      (want_dst >= 0 && dst_device >= 0 && wd != want_dst)) {
    violation(std::string(api) + " (" + kinds[kind] + "): from " + S().allocs[r.alloc].name +
              " to " + S().allocs[w.alloc].name + " does not match the kind or the devices");
    return ret(cudaErrorInvalidValue);
  }
  std::string k = kind == cudaMemcpyDeviceToHost ? "D2H" : kind == cudaMemcpyHostToDevice ? "H2D"
                                                                                          : "copy";
  std::string label = std::string(api) + " " + kinds[kind] + " " + region(w.alloc, w.lo, w.hi) +
                      " <- " + region(r.alloc, r.lo, r.hi);
  add_op(i, k, label, {r, w});
  return cudaSuccess;
}

}  // namespace

extern "C" {

// nvcc registers the (empty) device code of the .cu at start-up.
void** __cudaRegisterFatBinary(void*) {
  static void* handle = nullptr;
  return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = S().last;
  S().last = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorPeerAccessUnsupported: return "cudaErrorPeerAccessUnsupported";
    case cudaErrorPeerAccessAlreadyEnabled: return "cudaErrorPeerAccessAlreadyEnabled";
    default: return "cudaError (stub)";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "stub error";
  }
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = S().devices;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = S().current;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= S().devices) return ret(cudaErrorInvalidDevice);
  S().current = d;
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* can, int d, int peer) {
  if (d < 0 || d >= S().devices || peer < 0 || peer >= S().devices) {
    return ret(cudaErrorInvalidDevice);
  }
  *can = S().peer && d != peer;
  return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned int) {
  State& st = S();
  if (peer < 0 || peer >= st.devices || peer == st.current) return ret(cudaErrorInvalidDevice);
  if (!st.peer) return ret(cudaErrorPeerAccessUnsupported);
  if (!st.enabled.insert({st.current, peer}).second) {
    return ret(cudaErrorPeerAccessAlreadyEnabled);
  }
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* ev, unsigned int) {
  *ev = new CUevent_st{S().current, false, false, {}};
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t ev) {
  if (!valid_event(ev)) return ret(cudaErrorInvalidResourceHandle);
  ev->destroyed = true;  // kept, so that a later use is caught
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t ev, cudaStream_t s) {
  if (!valid_event(ev)) return ret(cudaErrorInvalidResourceHandle);
  const int i = resolve(s, "cudaEventRecord");
  if (i < 0) return ret(cudaErrorInvalidResourceHandle);
  Stream& str = S().streams[i];
  if (str.device != ev->device) return ret(cudaErrorInvalidResourceHandle);  // as CUDA does
  join(str.vc, S().host);
  ev->vc = str.vc;
  ev->recorded = true;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t ev, unsigned int) {
  if (!valid_event(ev)) return ret(cudaErrorInvalidResourceHandle);
  const int i = resolve(s, "cudaStreamWaitEvent");
  if (i < 0) return ret(cudaErrorInvalidResourceHandle);
  if (ev->recorded) join(S().streams[i].vc, ev->vc);  // cross-device waits are allowed
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t ev) {
  if (!valid_event(ev)) return ret(cudaErrorInvalidResourceHandle);
  if (ev->recorded) join(S().host, ev->vc);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) {
  State& st = S();
  char* c = static_cast<char*>(std::calloc(bytes ? bytes : 1, 1));
  st.allocs.push_back({c, bytes, -1, "pinned host block " + std::to_string(st.host_blocks++),
                       false});
  *p = c;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  State& st = S();
  for (Alloc& a : st.allocs) {
    if (a.base != p || a.device != -1 || a.freed) continue;
    const int idx = static_cast<int>(&a - st.allocs.data());
    for (const Op& op : st.ops) {
      for (const Access& acc : op.acc) {
        if (acc.alloc == idx && at(st.host, op.stream) < op.seq) {
          violation("cudaFreeHost(" + a.name + ") while " + describe(op) +
                    " may still be running (the host has not synchronised with it)");
        }
      }
    }
    a.freed = true;  // the memory itself is kept: no address is reused
    return cudaSuccess;
  }
  return ret(cudaErrorInvalidValue);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind,
                            cudaStream_t s) {
  if (kind != cudaMemcpyDeviceToDevice && kind != cudaMemcpyDeviceToHost &&
      kind != cudaMemcpyHostToDevice) {
    violation("cudaMemcpyAsync: kind " + std::to_string(kind) + " is not modelled");
    return ret(cudaErrorInvalidValue);
  }
  return copy(dst, src, n, kind, s, -2, -2, "cudaMemcpyAsync");
}

cudaError_t cudaMemcpyPeerAsync(void* dst, int dst_device, const void* src, int src_device,
                                size_t n, cudaStream_t s) {
  return copy(dst, src, n, cudaMemcpyDeviceToDevice, s, dst_device, src_device,
              "cudaMemcpyPeerAsync");
}

}  // extern "C"
'''

DRIVER_CPP = r'''
// Runs the peer engine's pattern through the sampa_cuda API against the stub
// runtime and reports what the stub found.
//   driver link MODE ROLES   one link, three steps (see tests/test_cuda_ordering.py)
//   driver api               the other entry points and their errors
//   driver selftest          the stub's model on cases with known answers
#include "sampa_fused.h"
#include "stub_cudart.h"

#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int kHome = 0;  // the caller's current device, which every call must restore
std::vector<std::string> g_failures;

void fail(const std::string& what) { g_failures.push_back(what); }

void call(const std::string& what, const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    fail(what + " threw: " + e.what());
  }
  int d = -1;
  cudaGetDevice(&d);
  if (d != kHome) {
    fail(what + " left the current device at cuda:" + std::to_string(d));
    cudaSetDevice(kHome);
  }
}

void expect_throw(const std::string& what, const std::function<void()>& f,
                  const std::string& needle) {
  try {
    f();
  } catch (const std::exception& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      fail(what + ": the error does not say '" + needle + "': " + e.what());
    }
    return;
  }
  fail(what + " did not throw");
}

void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

struct Role {
  std::string name;
  int device;
  cudaStream_t stream;
};

std::string describe(const Role& r) {
  return r.name + " on cuda:" + std::to_string(r.device) +
         (r.stream ? " (a side stream)" : " (the default stream)");
}

void kernel(const Role& r, const char* kind, const std::string& label, const void* p, size_t n,
            bool write) {
  cudaSetDevice(r.device);  // a kernel on device d runs with d current
  stub::kernel(r.stream, kind, label, p, n, write);
  cudaSetDevice(kHome);
}

// The application's own ordering of its streams between steps (the peer
// engine uses one stream for reader and consumer, and for producer and owner).
void app_order(const Role& later, const Role& earlier) {
  cudaEvent_t ev;
  cudaSetDevice(earlier.device);
  cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  cudaEventRecord(ev, earlier.stream);
  cudaSetDevice(later.device);
  cudaStreamWaitEvent(later.stream, ev, 0);
  cudaSetDevice(kHome);
}

int report(const std::string& title) {
  const auto& v = stub::violations();
  std::printf("%s\n", title.c_str());
  for (const auto& [k, n] : stub::ordered_pairs()) {
    std::printf("  ordered: %s x%ld\n", k.c_str(), n);
  }
  for (const auto& s : v) std::printf("  VIOLATION: %s\n", s.c_str());
  for (const auto& s : g_failures) std::printf("  FAILURE: %s\n", s.c_str());
  if (v.empty() && g_failures.empty()) {
    std::printf("RESULT: OK\n");
    return 0;
  }
  std::printf("RESULT: FAILED (%zu violation(s), %zu failure(s))\n", v.size(), g_failures.size());
  return 1;
}

struct Mode {
  const char* name;
  int src, dst;
  bool staged, peer;
  int expect;  // link_mode: 0 device, 1 peer, 2 staged
};

const Mode kModes[] = {
    {"device", 0, 0, false, true, 0},      {"peer", 0, 1, false, true, 1},
    {"peer-reverse", 1, 0, false, true, 1}, {"staged", 0, 1, true, true, 2},
    {"fallback", 1, 0, false, false, 2},    {"staged-same", 0, 0, true, true, 2},
};

constexpr size_t kBytes = 1000;
constexpr int64_t kStaging = 192;  // two slots of 96 bytes: 3 to 5 chunks per copy

int run_link(const std::string& mode_name, const std::string& roles) {
  const Mode* mode = nullptr;
  for (const Mode& m : kModes) {
    if (mode_name == m.name) mode = &m;
  }
  std::set<std::string> t;
  std::stringstream ss(roles);
  for (std::string tok; std::getline(ss, tok, ',');) t.insert(tok);
  for (const auto& tok : t) {
    static const std::set<std::string> known = {"side", "null-reader", "null-producer",
                                                "null-consumer", "null-owner", "null-roles",
                                                "null-link", "shared"};
    if (!known.count(tok)) {
      std::printf("unknown role token '%s'\n", tok.c_str());
      return 2;
    }
  }
  if (!mode) {
    std::printf("unknown mode '%s'\n", mode_name.c_str());
    return 2;
  }
  const bool all = t.count("null-roles") > 0, shared = t.count("shared") > 0;
  stub::reset(2, mode->peer);
  cudaSetDevice(kHome);
  auto make = [&](const char* name, int device, bool null) {
    return Role{name, device, null ? nullptr : stub::stream(device, name)};
  };
  const int S = mode->src, D = mode->dst;
  Role copy_src = make("link copy stream (src side)", S, t.count("null-link") > 0);
  Role copy_dst = make("link copy stream (dst side)", D, t.count("null-link") > 0);
  Role R = make(shared ? "reader/consumer" : "reader", D, all || t.count("null-reader"));
  Role C = shared ? R : make("consumer", D, all || t.count("null-consumer"));
  Role P = make(shared ? "producer/owner" : "producer", S, all || t.count("null-producer"));
  Role O = shared ? P : make("owner", S, all || t.count("null-owner"));
  auto* src = static_cast<char*>(stub::device_buffer(S, kBytes, "src"));
  auto* dst = static_cast<char*>(stub::device_buffer(D, kBytes, "dst"));

  std::string title = std::string("link ") + mode->name + " cuda:" + std::to_string(S) +
                      " -> cuda:" + std::to_string(D) + ", roles " + roles + ": " +
                      describe(R) + ", " + describe(P) + ", " + describe(C) + ", " +
                      describe(O) + ", " + describe(copy_src) + ", " + describe(copy_dst);
  std::shared_ptr<sampa_cuda::LinkImpl> link;
  call("link_create", [&] {
    link = sampa_cuda::link_create(S, D, copy_src.stream, copy_dst.stream, mode->staged,
                                   kStaging);
  });
  if (!link) return report(title);
  const bool staged = mode->expect == 2;
  call("link_mode", [&] {
    const int m = sampa_cuda::link_mode(*link);
    check(m == mode->expect, "link_mode is " + std::to_string(m) + ", expected " +
                                 std::to_string(mode->expect));
    const int64_t sb = sampa_cuda::link_slot_bytes(*link);
    check(sb == (staged ? kStaging / 2 : 0), "link_slot_bytes is " + std::to_string(sb));
  });
  // Backward order (the end of the buffer first), with an empty bucket.
  const std::pair<size_t, size_t> buckets[] = {{600, 1000}, {250, 600}, {250, 250}, {0, 250}};
  for (int step = 0; step < 3; ++step) {
    const std::string at = "step " + std::to_string(step) + ": ";
    if (step > 0) {
      app_order(R, C);
      app_order(P, O);
    }
    kernel(R, "reader", at + "reader reads dst", dst, kBytes, false);
    call(at + "link_begin", [&] { sampa_cuda::link_begin(*link, R.stream); });
    for (auto [a, b] : buckets) {
      const std::string range = "[" + std::to_string(a) + ", " + std::to_string(b) + ")";
      if (b > a) kernel(P, "producer", at + "producer writes src" + range, src + a, b - a, true);
      call(at + "link_copy " + range, [&] {
        sampa_cuda::link_copy(*link, dst + a, src + a, static_cast<int64_t>(b - a), P.stream);
      });
    }
    call(at + "link_finish", [&] { sampa_cuda::link_finish(*link, C.stream, O.stream); });
    kernel(C, "consumer", at + "consumer reads dst", dst, kBytes, false);
    kernel(O, "owner", at + "owner overwrites src", src, kBytes, true);
  }
  link.reset();  // frees the staging slots: only once their copies are done
  // Each required ordering must have been exercised, not just found race-free.
  const std::vector<std::string> need =
      staged ? std::vector<std::string>{"producer -> D2H", "D2H -> owner", "reader -> H2D",
                                        "H2D -> consumer", "D2H -> H2D", "H2D -> D2H"}
             : std::vector<std::string>{"producer -> copy", "copy -> owner", "reader -> copy",
                                        "copy -> consumer"};
  for (const auto& k : need) {
    check(stub::ordered_pairs().count(k) > 0, "no ordered pair '" + k + "' was seen");
  }
  return report(title);
}

int run_api() {
  stub::reset(2, true);
  cudaSetDevice(kHome);
  call("device_count", [] { check(sampa_cuda::device_count() == 2, "device_count != 2"); });
  call("can_access_peer", [] {
    check(sampa_cuda::can_access_peer(0, 1), "can_access_peer(0, 1) is false with peer access");
    check(sampa_cuda::can_access_peer(1, 1), "can_access_peer(1, 1) is false");
  });
  call("enable_peer_access", [] {
    check(sampa_cuda::enable_peer_access(0, 1), "enable_peer_access(0, 1) is false");
    check(sampa_cuda::enable_peer_access(1, 0), "enable_peer_access, again, is false");
  });
  expect_throw("can_access_peer(0, 5)", [] { sampa_cuda::can_access_peer(0, 5); },
               "cuda:5 does not exist");
  expect_throw("a staged link with 1 byte of staging",
               [] { sampa_cuda::link_create(0, 1, nullptr, nullptr, true, 1); },
               "at least 2 bytes");
  auto* a = static_cast<char*>(stub::device_buffer(0, 64, "a"));
  auto* b = static_cast<char*>(stub::device_buffer(1, 64, "b"));
  auto* b2 = static_cast<char*>(stub::device_buffer(1, 64, "b2"));
  call("memcpy_async cuda:0 -> cuda:1", [&] { sampa_cuda::memcpy_async(b, 1, a, 0, 64, nullptr); });
  check(stub::last_op_stream() == "the default stream (null) of cuda:0",
        "memcpy_async with a null stream ran on " + stub::last_op_stream());
  call("memcpy_async cuda:1 -> cuda:1",
       [&] { sampa_cuda::memcpy_async(b2, 1, b, 1, 64, nullptr); });
  check(stub::last_op_stream() == "the default stream (null) of cuda:1",
        "memcpy_async on cuda:1 with a null stream ran on " + stub::last_op_stream());
  // A reader stream of the wrong device is refused with a message saying so.
  cudaStream_t on0 = stub::stream(0, "side stream");
  call("link_create", [&] {
    auto link = sampa_cuda::link_create(0, 1, on0, stub::stream(1, "s1"), false, 0);
    expect_throw("link_begin with a reader on cuda:0", [&] { sampa_cuda::link_begin(*link, on0); },
                 "the reader stream must belong to cuda:1");
  });
  stub::reset(2, false);
  cudaSetDevice(kHome);
  call("no peer access", [] {
    check(!sampa_cuda::can_access_peer(0, 1), "can_access_peer(0, 1) without peer access");
    check(!sampa_cuda::enable_peer_access(0, 1), "enable_peer_access(0, 1) without peer access");
  });
  return report("api");
}

// The model itself, on cases whose answer is known: the number of races.
int run_selftest() {
  struct Case {
    const char* name;
    size_t expect;
    std::function<void()> body;
  };
  const std::vector<Case> cases = {
      {"unordered streams race", 1,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         void* p = stub::device_buffer(0, 64, "buf");
         stub::kernel(s1, "w", "write", p, 64, true);
         stub::kernel(s2, "r", "read", p, 64, false);
       }},
      {"record then wait orders", 0,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         void* p = stub::device_buffer(0, 64, "buf");
         cudaEvent_t e;
         cudaEventCreateWithFlags(&e, 0);
         stub::kernel(s1, "w", "write", p, 64, true);
         cudaEventRecord(e, s1);
         cudaStreamWaitEvent(s2, e, 0);
         stub::kernel(s2, "r", "read", p, 64, false);
       }},
      {"a wait before the record orders nothing", 1,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         void* p = stub::device_buffer(0, 64, "buf");
         cudaEvent_t e;
         cudaEventCreateWithFlags(&e, 0);
         cudaStreamWaitEvent(s2, e, 0);
         stub::kernel(s1, "w", "write", p, 64, true);
         cudaEventRecord(e, s1);
         stub::kernel(s2, "r", "read", p, 64, false);
       }},
      {"a wait captures the record it saw, not a later one", 1,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         char* p = static_cast<char*>(stub::device_buffer(0, 64, "buf"));
         cudaEvent_t e;
         cudaEventCreateWithFlags(&e, 0);
         stub::kernel(s1, "w", "write 1", p, 32, true);
         cudaEventRecord(e, s1);
         cudaStreamWaitEvent(s2, e, 0);
         stub::kernel(s1, "w", "write 2", p + 32, 32, true);
         cudaEventRecord(e, s1);
         stub::kernel(s2, "r", "read", p, 64, false);  // after write 1 only
       }},
      {"the default stream and a side stream race", 2,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1");
         void* p = stub::device_buffer(0, 64, "buf");
         stub::kernel(nullptr, "w", "write", p, 64, true);
         stub::kernel(s1, "r", "read", p, 64, false);
         stub::kernel(nullptr, "w", "write again", p, 64, true);
       }},
      {"the default streams of two devices are two streams", 1,
       [] {
         void* p = stub::device_buffer(0, 64, "buf");
         stub::kernel(nullptr, "w", "write", p, 64, true);
         cudaSetDevice(1);
         cudaMemcpyPeerAsync(stub::device_buffer(1, 64, "out"), 1, p, 0, 64, nullptr);
         cudaSetDevice(0);
       }},
      {"waits are transitive, across devices", 0,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(1, "s2");
         cudaStream_t s3 = stub::stream(0, "s3");
         void* p = stub::device_buffer(0, 64, "buf");
         cudaEvent_t e1, e2;
         cudaEventCreateWithFlags(&e1, 0);
         cudaSetDevice(1);
         cudaEventCreateWithFlags(&e2, 0);
         cudaSetDevice(0);
         stub::kernel(s1, "w", "write", p, 64, true);
         cudaEventRecord(e1, s1);
         cudaStreamWaitEvent(s2, e1, 0);
         cudaEventRecord(e2, s2);
         cudaStreamWaitEvent(s3, e2, 0);
         stub::kernel(s3, "r", "read", p, 64, false);
       }},
      {"reads do not conflict; disjoint writes do not either", 0,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         char* p = static_cast<char*>(stub::device_buffer(0, 64, "buf"));
         char* q = static_cast<char*>(stub::device_buffer(0, 64, "other"));
         stub::kernel(s1, "r", "read", p, 64, false);
         stub::kernel(s2, "r", "read", p, 64, false);
         stub::kernel(s1, "w", "write low", q, 32, true);
         stub::kernel(s2, "w", "write high", q + 32, 32, true);
       }},
      {"a host sync orders what the host enqueues next", 0,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1"), s2 = stub::stream(0, "s2");
         void* p = stub::device_buffer(0, 64, "buf");
         cudaEvent_t e;
         cudaEventCreateWithFlags(&e, 0);
         stub::kernel(s1, "w", "write", p, 64, true);
         cudaEventRecord(e, s1);
         cudaEventSynchronize(e);
         stub::kernel(s2, "r", "read", p, 64, false);
       }},
      {"freeing pinned memory under a running copy", 1,
       [] {
         cudaStream_t s1 = stub::stream(0, "s1");
         void* h;
         cudaHostAlloc(&h, 64, 0);
         cudaMemcpyAsync(h, stub::device_buffer(0, 64, "buf"), 64, cudaMemcpyDeviceToHost, s1);
         cudaFreeHost(h);
       }},
      {"recording on another device's stream is refused", 0,
       [] {
         cudaEvent_t e;
         cudaEventCreateWithFlags(&e, 0);  // on cuda:0
         const bool refused = cudaEventRecord(e, stub::stream(1, "s1")) != cudaSuccess;
         const bool reported = cudaGetLastError() != cudaSuccess;
         const bool cleared = cudaGetLastError() == cudaSuccess;
         check(refused && reported && cleared, "cudaEventRecord across devices not refused");
       }},
  };
  int bad = 0;
  for (const Case& c : cases) {
    stub::reset(2, true);
    g_failures.clear();
    c.body();
    const size_t got = stub::violations().size();
    const bool ok = got == c.expect && g_failures.empty();
    std::printf("%s: %zu race(s), expected %zu%s\n", c.name, got, c.expect,
                ok ? "" : "  <-- WRONG");
    for (const auto& s : stub::violations()) std::printf("  %s\n", s.c_str());
    for (const auto& s : g_failures) std::printf("  FAILURE: %s\n", s.c_str());
    bad += !ok;
  }
  std::printf("RESULT: %s\n", bad ? "FAILED" : "OK");
  return bad ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "link" && argc == 4) return run_link(argv[2], argv[3]);
  if (cmd == "api" && argc == 2) return run_api();
  if (cmd == "selftest" && argc == 2) return run_selftest();
  std::fprintf(stderr, "usage: %s link MODE ROLES | api | selftest\n", argv[0]);
  return 2;
}
'''


# ---------------------------------------------------------------- building
def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _toolchain():
    """(nvcc, c++ compiler, CUDA include folder), or a reason why not."""
    nvcc = _nvcc()
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME): the CUDA source cannot be compiled"
    if os.environ.get("CXX"):
        cxx = shlex.split(os.environ["CXX"])     # e.g. "ccache g++"
        if not cxx or shutil.which(cxx[0]) is None:
            return None, f"$CXX={os.environ['CXX']!r} is not an executable C++ compiler"
    else:
        found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if found is None:
            return None, "no C++ compiler (g++, c++, clang++ or $CXX) for the stub runtime"
        cxx = [found]
    include = Path(nvcc).resolve().parent.parent / "include"
    if not (include / "cuda_runtime_api.h").exists():
        return None, f"cuda_runtime_api.h not found in {include}"
    return (nvcc, cxx, include), None


def _run(cmd, what):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(map(str, cmd))}):\n"
                           f"{(res.stdout + res.stderr)[-6000:]}")


def build_driver(cu: Path, workdir: Path, toolchain) -> Path:
    """Compile `cu` with nvcc (compile only), the stub and the driver with the
    C++ compiler, and link them into workdir/driver."""
    nvcc, cxx, include = toolchain
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "stub_cudart.h").write_text(STUB_H)
    (workdir / "stub_cudart.cpp").write_text(STUB_CPP)
    (workdir / "driver.cpp").write_text(DRIVER_CPP)
    obj = workdir / "cu.o"
    _run([nvcc, "-std=c++17", "-O1", "-Xcompiler", "-fPIC", "-I", CSRC, "-c", cu, "-o", obj],
         f"nvcc on {cu}")
    exe = workdir / "driver"
    _run([*cxx, "-std=c++17", "-O1", "-Wall", "-I", workdir, "-I", CSRC, "-I", include,
          workdir / "driver.cpp", workdir / "stub_cudart.cpp", obj, "-o", exe, "-pthread"],
         "building the stub runtime and the driver")
    return exe


def run_driver(exe: Path, *args: str):
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="session")
def toolchain():
    tc, why = _toolchain()
    if tc is None:
        pytest.skip(why)
    return tc


@pytest.fixture(scope="session")
def driver(toolchain, tmp_path_factory):
    return build_driver(CU, tmp_path_factory.mktemp("ordering"), toolchain)


# ---------------------------------------------------------------- tests
def test_stub_model_answers_known_cases(driver):
    """The stub flags exactly the races of cases whose answer is known, so a
    clean report below means something."""
    rc, out = run_driver(driver, "selftest")
    assert rc == 0 and "RESULT: OK" in out, out


def test_api_through_the_header(driver):
    """Every function of csrc/sampa_fused.h links and behaves (errors included);
    a null stream for memcpy_async is the source device's default stream."""
    rc, out = run_driver(driver, "api")
    assert rc == 0 and "RESULT: OK" in out, out


@pytest.mark.parametrize("roles", ROLES)
@pytest.mark.parametrize("mode", MODES)
def test_link_orders_every_access(driver, mode, roles):
    rc, out = run_driver(driver, "link", mode, roles)
    assert rc == 0 and "RESULT: OK" in out, out


def _call_sites(source: str, calls=("cudaStreamWaitEvent", "cudaEventRecord")):
    """(start, end) of each `SAMPA_CUDA_CHECK(<call>(...), ...);` statement."""
    sites = []
    for call in calls:
        needle = f"SAMPA_CUDA_CHECK({call}("
        pos = source.find(needle)
        while pos != -1:
            depth, i, in_str = 0, pos, False
            while True:                 # to the matching ')', skipping string literals
                c = source[i]
                if in_str:
                    if c == "\\":
                        i += 1
                    elif c == '"':
                        in_str = False
                elif c == '"':
                    in_str = True
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            end = source.index(";", i) + 1
            sites.append((pos, end))
            pos = source.find(needle, end)
    return sorted(sites)


def run_all(exe: Path):
    """[(mode, roles, rc, output)] over every configuration."""
    return [(m, r, *run_driver(exe, "link", m, r)) for m in MODES for r in ROLES]


@pytest.mark.skipif(os.environ.get("SAMPA_ORDERING_MUTANTS", "0") in ("", "0"),
                    reason="set SAMPA_ORDERING_MUTANTS=1 (about a minute: one nvcc per mutant)")
def test_every_wait_and_record_is_needed(toolchain, tmp_path):
    """Deleting any one cudaStreamWaitEvent or cudaEventRecord of the .cu makes
    some configuration report a race: none of them is dead weight, and the
    test above would catch the loss of any."""
    source = CU.read_text()
    sites = _call_sites(source)
    assert len(sites) >= 12, sites
    survivors = []
    for k, (a, b) in enumerate(sites):
        mutant = tmp_path / f"mutant{k}.cu"
        mutant.write_text(source[:a] + "(void)0;  // mutant: call deleted" + source[b:])
        exe = build_driver(mutant, tmp_path / f"m{k}", toolchain)
        if all(rc == 0 for *_, rc, _ in run_all(exe)):
            line = source.count("\n", 0, a) + 1
            survivors.append(f"line {line}: {source[a:b].splitlines()[0].strip()}")
    assert not survivors, "deleting these leaves every configuration race-free:\n" + \
        "\n".join(survivors)


if __name__ == "__main__":
    # python tests/test_cuda_ordering.py [path/to/sampa_fused_cuda.cu]
    import tempfile
    tc, why = _toolchain()
    if tc is None:
        sys.exit(why)
    cu = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else CU
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_driver(cu, Path(tmp), tc)
        failed = 0
        for mode, roles, rc, out in run_all(exe):
            failed += rc != 0
            print(out)
        print(f"{failed} of {len(MODES) * len(ROLES)} configurations failed")
        sys.exit(1 if failed else 0)
