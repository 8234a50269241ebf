// CUDA side of sampa_fused._C: peer access and bucketed copies between the
// flat buffers of two devices (the `peer` engine's gradient exchange).
//
// Only the CUDA runtime API is used here, no torch headers: this file compiles
// in a few seconds with a bare nvcc, so CI can check it on machines without a
// GPU or a CUDA build of torch, and so tests/test_cuda_ordering.py can link
// it against a stub runtime that checks the stream ordering. Tensors are
// checked and turned into pointers in sampa_fused.cpp; the API is declared in
// sampa_fused.h and defined here with qualified names, so the two cannot drift.
//
// Ordering model (one PeerLink per direction src -> dst):
//   begin(reader)      copies that write dst wait until `reader` (a stream on
//                      dst that last read dst) has got that far
//   copy(.., producer) the copy waits until `producer` (the stream that wrote
//                      this range of src) has got that far, then runs on the
//                      link's own copy stream
//   finish(consumer, owner)  `consumer` (a stream on dst) waits for every copy
//                      to have landed; `owner` (a stream on src) waits until
//                      the copies have read src, so it may overwrite it
// Events are reused: a stream wait captures the event's most recent record
// at the time of the wait, so recording the same event again later is safe.
// Every stream argument is recorded on or waited on unconditionally: nullptr
// is the legacy default stream of the device concerned (torch's default
// stream), and each is used under a DeviceScope of that device so that null
// resolves to the right device's default stream.

#include "sampa_fused.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

namespace sampa_cuda {
namespace {

std::string dev_name(int d) { return "cuda:" + std::to_string(d); }

[[noreturn]] void fail(cudaError_t err, const char* call, const std::string& context) {
  // Clear the sticky last-error state of non-fatal errors so later calls
  // do not report this one again.
  (void)cudaGetLastError();
  throw std::runtime_error("sampa_fused: " + context + ": " + call + " failed: " +
                           cudaGetErrorString(err) + " (" + cudaGetErrorName(err) + ")");
}

// The context string is built only on failure.
#define SAMPA_CUDA_CHECK(call, context_expr)        \
  do {                                              \
    cudaError_t sampa_err_ = (call);                \
    if (sampa_err_ != cudaSuccess) {                \
      fail(sampa_err_, #call, (context_expr));      \
    }                                               \
  } while (0)

// Switch the calling thread's current device for a scope, and back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    SAMPA_CUDA_CHECK(cudaGetDevice(&prev_), std::string("querying the current device"));
    if (prev_ != device) {
      SAMPA_CUDA_CHECK(cudaSetDevice(device), "selecting " + dev_name(device));
    }
  }
  ~DeviceScope() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) {
      (void)cudaSetDevice(prev_);
    }
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

void check_device_index(int d, const char* role) {
  int n = 0;
  SAMPA_CUDA_CHECK(cudaGetDeviceCount(&n), std::string("counting CUDA devices"));
  if (d < 0 || d >= n) {
    throw std::runtime_error(std::string("sampa_fused: ") + role + " device " + dev_name(d) +
                             " does not exist (this process sees " + std::to_string(n) +
                             " CUDA device(s))");
  }
}

cudaEvent_t make_event(int device) {
  DeviceScope scope(device);
  cudaEvent_t ev = nullptr;
  SAMPA_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming),
                   "creating an event on " + dev_name(device));
  return ev;
}

std::mutex g_peer_mutex;
std::set<std::pair<int, int>> g_peer_enabled;  // (from, to): from may access to's memory

constexpr int kModeDevice = 0;  // src == dst: device-to-device copy
constexpr int kModePeer = 1;    // peer-to-peer copy over NVLink / PCIe
constexpr int kModeStaged = 2;  // through pinned host memory, double-buffered

}  // namespace
}  // namespace sampa_cuda

int sampa_cuda::device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // no driver or no device: the caller reports that clearly
  }
  return n;
}

bool sampa_cuda::can_access_peer(int a, int b) {
  check_device_index(a, "first");
  check_device_index(b, "second");
  if (a == b) return true;
  int ab = 0, ba = 0;
  SAMPA_CUDA_CHECK(cudaDeviceCanAccessPeer(&ab, a, b),
                   "asking whether " + dev_name(a) + " can access " + dev_name(b));
  SAMPA_CUDA_CHECK(cudaDeviceCanAccessPeer(&ba, b, a),
                   "asking whether " + dev_name(b) + " can access " + dev_name(a));
  return ab && ba;
}

bool sampa_cuda::enable_peer_access(int a, int b) {
  if (!can_access_peer(a, b)) return false;
  if (a == b) return true;
  std::lock_guard<std::mutex> lock(g_peer_mutex);
  for (auto [from, to] : {std::make_pair(a, b), std::make_pair(b, a)}) {
    if (g_peer_enabled.count({from, to})) continue;
    DeviceScope scope(from);
    cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // enabled earlier, e.g. by NCCL or torch: fine
    } else if (err != cudaSuccess) {
      fail(err, "cudaDeviceEnablePeerAccess",
           "enabling peer access from " + dev_name(from) + " to " + dev_name(to));
    }
    g_peer_enabled.insert({from, to});
  }
  return true;
}

struct sampa_cuda::LinkImpl {
  int src = 0, dst = 0, mode = kModeDevice;
  cudaStream_t src_stream = nullptr;  // on src: peer / device copies, staged device-to-host
  cudaStream_t dst_stream = nullptr;  // on dst: staged host-to-device
  cudaEvent_t produced = nullptr;     // on src, recorded on the producer stream
  cudaEvent_t read_done = nullptr;    // on dst, recorded on the reader stream
  cudaEvent_t src_done = nullptr;     // on src, recorded on src_stream
  cudaEvent_t dst_done = nullptr;     // on dst, recorded on dst_stream (staged)
  void* host[2] = {nullptr, nullptr};
  cudaEvent_t filled[2] = {nullptr, nullptr};  // on src: a host slot holds data
  cudaEvent_t freed[2] = {nullptr, nullptr};   // on dst: a host slot was read
  int64_t slot_bytes = 0;
  int next_slot = 0;
  std::mutex mutex;  // one direction is driven by one thread; this guards misuse

  std::string where(int64_t nbytes) const {
    static const char* names[] = {"device-to-device", "peer", "staged"};
    return std::string(names[mode]) + " copy " + dev_name(src) + " -> " + dev_name(dst) +
           " of " + std::to_string(nbytes) + " bytes";
  }

  ~LinkImpl() {
    // Must not throw. Staged copies still in flight finish before their host
    // slots are freed (an event never recorded counts as complete).
    for (int s = 0; s < 2; ++s) {
      if (filled[s]) (void)cudaEventSynchronize(filled[s]);
      if (freed[s]) (void)cudaEventSynchronize(freed[s]);
    }
    for (cudaEvent_t ev : {produced, read_done, src_done, dst_done, filled[0], filled[1],
                           freed[0], freed[1]}) {
      if (ev) (void)cudaEventDestroy(ev);
    }
    for (void* h : host) {
      if (h) (void)cudaFreeHost(h);
    }
    (void)cudaGetLastError();
  }
};

std::shared_ptr<sampa_cuda::LinkImpl> sampa_cuda::link_create(int src, int dst, void* src_stream,
                                                              void* dst_stream, bool staged,
                                                              int64_t staging_bytes) {
  check_device_index(src, "source");
  check_device_index(dst, "destination");
  auto link = std::make_shared<LinkImpl>();
  link->src = src;
  link->dst = dst;
  link->src_stream = static_cast<cudaStream_t>(src_stream);
  link->dst_stream = static_cast<cudaStream_t>(dst_stream);
  if (staged) {
    link->mode = kModeStaged;
  } else if (src == dst) {
    link->mode = kModeDevice;
  } else if (enable_peer_access(src, dst)) {
    link->mode = kModePeer;
  } else {
    link->mode = kModeStaged;  // no peer path between these devices
  }
  link->produced = make_event(src);
  link->src_done = make_event(src);
  link->read_done = make_event(dst);
  link->dst_done = make_event(dst);
  if (link->mode == kModeStaged) {
    if (staging_bytes < 2) {
      throw std::runtime_error("sampa_fused: staged copy " + dev_name(src) + " -> " +
                               dev_name(dst) + " needs a staging buffer of at least 2 bytes, got " +
                               std::to_string(staging_bytes));
    }
    link->slot_bytes = staging_bytes / 2;
    for (int s = 0; s < 2; ++s) {
      DeviceScope scope(src);
      SAMPA_CUDA_CHECK(cudaHostAlloc(&link->host[s], static_cast<size_t>(link->slot_bytes),
                                     cudaHostAllocPortable),
                       "allocating " + std::to_string(link->slot_bytes) +
                           " bytes of pinned host memory for the staged copy " + dev_name(src) +
                           " -> " + dev_name(dst));
      link->filled[s] = make_event(src);
      link->freed[s] = make_event(dst);
    }
  }
  return link;
}

int sampa_cuda::link_mode(const LinkImpl& link) { return link.mode; }

int64_t sampa_cuda::link_slot_bytes(const LinkImpl& link) { return link.slot_bytes; }

void sampa_cuda::link_begin(LinkImpl& link, void* reader_stream) {
  std::lock_guard<std::mutex> lock(link.mutex);
  auto reader = static_cast<cudaStream_t>(reader_stream);
  // The stream that writes dst: the copy stream (on src), or the host-to-device
  // stream (on dst).
  const bool staged = link.mode == kModeStaged;
  cudaStream_t writer = staged ? link.dst_stream : link.src_stream;
  {
    DeviceScope scope(link.dst);  // a null reader is dst's default stream
    SAMPA_CUDA_CHECK(cudaEventRecord(link.read_done, reader),
                     "ordering the " + link.where(0) + " after the readers of the destination "
                     "(the reader stream must belong to " + dev_name(link.dst) + ")");
  }
  // Waited on from the writer's own device: a null writer is that device's
  // default stream, not the current one's.
  DeviceScope scope(staged ? link.dst : link.src);
  SAMPA_CUDA_CHECK(cudaStreamWaitEvent(writer, link.read_done, 0),
                   "ordering the " + link.where(0) + " after the readers of the destination");
}

void sampa_cuda::link_copy(LinkImpl& link, void* dst, const void* src, int64_t nbytes,
                           void* producer_stream) {
  if (nbytes <= 0) return;
  std::lock_guard<std::mutex> lock(link.mutex);
  auto producer = static_cast<cudaStream_t>(producer_stream);
  {
    DeviceScope scope(link.src);
    SAMPA_CUDA_CHECK(cudaEventRecord(link.produced, producer),
                     "ordering the " + link.where(nbytes) + " after its producer (the producer "
                     "stream must belong to " + dev_name(link.src) + ")");
    SAMPA_CUDA_CHECK(cudaStreamWaitEvent(link.src_stream, link.produced, 0),
                     "ordering the " + link.where(nbytes) + " after its producer");
    if (link.mode == kModeDevice) {
      SAMPA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(nbytes),
                                       cudaMemcpyDeviceToDevice, link.src_stream),
                       link.where(nbytes));
      return;
    }
    if (link.mode == kModePeer) {
      SAMPA_CUDA_CHECK(cudaMemcpyPeerAsync(dst, link.dst, src, link.src,
                                           static_cast<size_t>(nbytes), link.src_stream),
                       link.where(nbytes));
      return;
    }
  }
  // Staged: device-to-host into one pinned slot on src_stream while the
  // other slot goes host-to-device on dst_stream.
  auto* d = static_cast<char*>(dst);
  auto* s = static_cast<const char*>(src);
  for (int64_t off = 0; off < nbytes; off += link.slot_bytes) {
    const int64_t n = nbytes - off < link.slot_bytes ? nbytes - off : link.slot_bytes;
    const int slot = link.next_slot;
    link.next_slot ^= 1;
    {
      DeviceScope scope(link.src);
      SAMPA_CUDA_CHECK(cudaStreamWaitEvent(link.src_stream, link.freed[slot], 0),
                       link.where(nbytes) + " (waiting for a free staging slot)");
      SAMPA_CUDA_CHECK(cudaMemcpyAsync(link.host[slot], s + off, static_cast<size_t>(n),
                                       cudaMemcpyDeviceToHost, link.src_stream),
                       link.where(nbytes) + " (device-to-host part of " + std::to_string(n) +
                           " bytes)");
      SAMPA_CUDA_CHECK(cudaEventRecord(link.filled[slot], link.src_stream), link.where(nbytes));
    }
    {
      DeviceScope scope(link.dst);
      SAMPA_CUDA_CHECK(cudaStreamWaitEvent(link.dst_stream, link.filled[slot], 0),
                       link.where(nbytes));
      SAMPA_CUDA_CHECK(cudaMemcpyAsync(d + off, link.host[slot], static_cast<size_t>(n),
                                       cudaMemcpyHostToDevice, link.dst_stream),
                       link.where(nbytes) + " (host-to-device part of " + std::to_string(n) +
                           " bytes)");
      SAMPA_CUDA_CHECK(cudaEventRecord(link.freed[slot], link.dst_stream), link.where(nbytes));
    }
  }
}

void sampa_cuda::link_finish(LinkImpl& link, void* consumer_stream, void* owner_stream) {
  std::lock_guard<std::mutex> lock(link.mutex);
  // Both waits always happen: a null handle is the device's default stream
  // (torch's default stream), which torch's non-blocking side streams, and so
  // the copy streams, do not synchronise with implicitly.
  {
    DeviceScope scope(link.src);
    SAMPA_CUDA_CHECK(cudaEventRecord(link.src_done, link.src_stream),
                     "completing the " + link.where(0));
    SAMPA_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(owner_stream), link.src_done,
                                         0),
                     "ordering the source's owner stream after the " + link.where(0) +
                         " (it must belong to " + dev_name(link.src) + ")");
  }
  DeviceScope scope(link.dst);
  cudaEvent_t landed = link.src_done;
  if (link.mode == kModeStaged) {
    SAMPA_CUDA_CHECK(cudaEventRecord(link.dst_done, link.dst_stream),
                     "completing the " + link.where(0));
    landed = link.dst_done;
  }
  SAMPA_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(consumer_stream), landed, 0),
                   "ordering the consumer stream after the " + link.where(0) +
                       " (it must belong to " + dev_name(link.dst) + ")");
}

void sampa_cuda::memcpy_async(void* dst, int dst_device, const void* src, int src_device,
                              int64_t nbytes, void* stream) {
  if (nbytes <= 0) return;
  DeviceScope scope(src_device);
#define SAMPA_PLAIN_WHAT                                                              \
  ("plain copy " + dev_name(src_device) + " -> " + dev_name(dst_device) + " of " + \
   std::to_string(nbytes) + " bytes")
  if (src_device == dst_device) {
    SAMPA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(nbytes),
                                     cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)),
                     SAMPA_PLAIN_WHAT);
  } else {
    SAMPA_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_device, src, src_device,
                                         static_cast<size_t>(nbytes),
                                         static_cast<cudaStream_t>(stream)),
                     SAMPA_PLAIN_WHAT);
  }
#undef SAMPA_PLAIN_WHAT
}
