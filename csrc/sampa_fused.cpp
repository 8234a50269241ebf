// sampa_fused._C: Python bindings of the CUDA part (sampa_fused_cuda.cu), and
// clear refusals where it is not built. (The flat-buffer layout runs once at
// set-up: it is Python, sampa_fused.flat.plan_layout.)
//
//   has_cuda() -> bool            built with the CUDA part (sampa_fused_cuda.cu)
//   device_count(), can_access_peer(a, b), enable_peer_access(a, b)
//   PeerLink(src, dst, src_stream, dst_stream, staged, staging_bytes)
//       ordered asynchronous copies of ranges of one flat buffer into another
//       device's flat buffer (the peer engine's gradient exchange)
//   memcpy_async(dst, src, stream)  a plain cudaMemcpy(Peer)Async, for benchmarks
//
// Streams cross the boundary as their raw handles (torch.cuda.Stream.cuda_stream);
// -1 means "the current torch stream of the device concerned". 0 is the
// device's default stream (torch's default stream has handle 0), ordered like
// any other: there is no handle meaning "no stream".

#include "sampa_fused.h"

#include <torch/extension.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace py = pybind11;

// ---------------------------------------------------------------- CUDA part
// Declared in sampa_fused.h, implemented in sampa_fused_cuda.cu for CUDA
// builds; the CPU build defines them below as functions that refuse clearly.

[[noreturn]] static void no_cuda() {
  throw std::runtime_error(
      "sampa_fused._C was built without its CUDA part (a CPU-only torch, or no nvcc "
      "when it was built). Rebuild it with a CUDA build of torch and CUDA_HOME pointing "
      "at the CUDA toolkit: `pip install --no-build-isolation -e .` "
      "(SAMPA_FUSED_BUILD=cuda makes a missing toolkit an error).");
}

#ifdef SAMPA_WITH_CUDA
static constexpr bool kHasCuda = true;
#else
static constexpr bool kHasCuda = false;
// Qualified definitions: one that does not match sampa_fused.h does not compile.
int sampa_cuda::device_count() { return 0; }
bool sampa_cuda::can_access_peer(int, int) { no_cuda(); }
bool sampa_cuda::enable_peer_access(int, int) { no_cuda(); }
std::shared_ptr<sampa_cuda::LinkImpl> sampa_cuda::link_create(int, int, void*, void*, bool,
                                                              int64_t) {
  no_cuda();
}
int sampa_cuda::link_mode(const LinkImpl&) { no_cuda(); }
int64_t sampa_cuda::link_slot_bytes(const LinkImpl&) { no_cuda(); }
void sampa_cuda::link_begin(LinkImpl&, void*) { no_cuda(); }
void sampa_cuda::link_copy(LinkImpl&, void*, const void*, int64_t, void*) { no_cuda(); }
void sampa_cuda::link_finish(LinkImpl&, void*, void*) { no_cuda(); }
void sampa_cuda::memcpy_async(void*, int, const void*, int, int64_t, void*) { no_cuda(); }
#endif

namespace {

// ------------------------------------------------------------------ streams
void* resolve_stream(int64_t handle, int device) {
  if (!kHasCuda) no_cuda();  // before asking a CPU-only torch for a CUDA stream
  if (handle != -1) return reinterpret_cast<void*>(static_cast<intptr_t>(handle));
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)))
      .native_handle();
}

std::string dev_name(int d) { return "cuda:" + std::to_string(d); }

int cuda_index(const at::Tensor& t, const char* what) {
  if (!t.is_cuda()) {
    throw py::value_error(std::string(what) + " must be a CUDA tensor, got one on " +
                          t.device().str());
  }
  if (!t.is_contiguous()) {
    throw py::value_error(std::string(what) + " must be contiguous (a flat buffer)");
  }
  return t.device().index();
}

const char* kModeNames[] = {"device", "peer", "staged"};

class PeerLink {
 public:
  PeerLink(int src, int dst, int64_t src_stream, int64_t dst_stream, bool staged,
           int64_t staging_bytes)
      : src_(src), dst_(dst) {
    impl_ = sampa_cuda::link_create(src, dst, resolve_stream(src_stream, src),
                                    resolve_stream(dst_stream, dst), staged, staging_bytes);
  }

  std::string mode() const { return kModeNames[sampa_cuda::link_mode(*impl_)]; }
  int64_t slot_bytes() const { return sampa_cuda::link_slot_bytes(*impl_); }
  int src() const { return src_; }
  int dst() const { return dst_; }

  void begin(int64_t reader_stream) {
    void* reader = resolve_stream(reader_stream, dst_);
    py::gil_scoped_release nogil;
    sampa_cuda::link_begin(*impl_, reader);
  }

  // Copy elements [start, end) of src into the same range of dst.
  void copy(const at::Tensor& dst, const at::Tensor& src, int64_t start, int64_t end,
            int64_t producer_stream) {
    const int di = cuda_index(dst, "PeerLink.copy: dst");
    const int si = cuda_index(src, "PeerLink.copy: src");
    if (di != dst_ || si != src_) {
      throw py::value_error("PeerLink.copy: this link copies " + dev_name(src_) + " -> " +
                            dev_name(dst_) + ", got src on " + dev_name(si) + " and dst on " +
                            dev_name(di));
    }
    if (dst.scalar_type() != src.scalar_type()) {
      throw py::value_error(std::string("PeerLink.copy: dtypes differ (src ") +
                            c10::toString(src.scalar_type()) + ", dst " +
                            c10::toString(dst.scalar_type()) + ")");
    }
    if (start < 0 || end < start || end > src.numel() || end > dst.numel()) {
      throw py::value_error("PeerLink.copy: range [" + std::to_string(start) + ", " +
                            std::to_string(end) + ") is outside src (" +
                            std::to_string(src.numel()) + " elements) or dst (" +
                            std::to_string(dst.numel()) + " elements)");
    }
    const int64_t es = static_cast<int64_t>(src.element_size());
    void* d = static_cast<char*>(dst.data_ptr()) + start * es;
    const void* s = static_cast<const char*>(src.data_ptr()) + start * es;
    void* producer = resolve_stream(producer_stream, src_);
    py::gil_scoped_release nogil;
    sampa_cuda::link_copy(*impl_, d, s, (end - start) * es, producer);
  }

  void finish(int64_t consumer_stream, int64_t owner_stream) {
    void* consumer = resolve_stream(consumer_stream, dst_);
    void* owner = resolve_stream(owner_stream, src_);
    py::gil_scoped_release nogil;
    sampa_cuda::link_finish(*impl_, consumer, owner);
  }

 private:
  int src_, dst_;
  std::shared_ptr<sampa_cuda::LinkImpl> impl_;
};

void memcpy_async(const at::Tensor& dst, const at::Tensor& src, int64_t stream) {
  const int di = cuda_index(dst, "memcpy_async: dst");
  const int si = cuda_index(src, "memcpy_async: src");
  const int64_t nbytes = src.numel() * static_cast<int64_t>(src.element_size());
  if (dst.numel() * static_cast<int64_t>(dst.element_size()) != nbytes) {
    throw py::value_error("memcpy_async: src and dst sizes differ (" + std::to_string(nbytes) +
                          " and " + std::to_string(dst.numel() * dst.element_size()) + " bytes)");
  }
  void* s = resolve_stream(stream, si);
  py::gil_scoped_release nogil;
  sampa_cuda::memcpy_async(dst.data_ptr(), di, src.data_ptr(), si, nbytes, s);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sampa_fused compiled extension: the peer engine's copies between devices";
  m.def("has_cuda", []() { return kHasCuda; }, "True when built with the CUDA part.");
  m.def("device_count", []() { return sampa_cuda::device_count(); },
        "CUDA devices visible to the extension (0 without its CUDA part).");
  m.def("can_access_peer", &sampa_cuda::can_access_peer, py::arg("a"), py::arg("b"));
  m.def("enable_peer_access", &sampa_cuda::enable_peer_access, py::arg("a"), py::arg("b"),
        "Enable peer access both ways, once per pair; False when the devices cannot.");
  m.def("memcpy_async", &memcpy_async, py::arg("dst"), py::arg("src"), py::arg("stream") = -1,
        "One plain cudaMemcpyAsync / cudaMemcpyPeerAsync of src into dst (benchmark baseline).");
  py::class_<PeerLink>(m, "PeerLink")
      .def(py::init<int, int, int64_t, int64_t, bool, int64_t>(), py::arg("src"), py::arg("dst"),
           py::arg("src_stream"), py::arg("dst_stream"), py::arg("staged") = false,
           py::arg("staging_bytes") = 8 << 20)
      .def_property_readonly("mode", &PeerLink::mode,
                             "'device' (same device), 'peer', or 'staged' (via pinned host memory)")
      .def_property_readonly("slot_bytes", &PeerLink::slot_bytes)
      .def_property_readonly("src", &PeerLink::src)
      .def_property_readonly("dst", &PeerLink::dst)
      .def("begin", &PeerLink::begin, py::arg("reader_stream") = -1)
      .def("copy", &PeerLink::copy, py::arg("dst"), py::arg("src"), py::arg("start"),
           py::arg("end"), py::arg("producer_stream") = -1)
      .def("finish", &PeerLink::finish, py::arg("consumer_stream") = -1,
           py::arg("owner_stream") = -1);
}
