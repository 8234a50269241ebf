// The C API of the CUDA part of sampa_fused._C (namespace sampa_cuda).
//
// Implemented in sampa_fused_cuda.cu for CUDA builds; sampa_fused.cpp defines
// the same functions as clear refusals in CPU builds. Both files define them
// with qualified names (`int sampa_cuda::device_count() {...}`), so a
// definition that drifts from this header is a compile error, not a missing
// symbol at import time.
//
// Free of torch and of CUDA headers: the CPU build includes it without a CUDA
// toolkit, the .cu compiles with a bare nvcc, and the stream-ordering test
// (tests/test_cuda_ordering.py) drives it against a stub CUDA runtime.
//
// Streams are cudaStream_t handles passed as void*. nullptr is the legacy
// default stream of the device concerned (torch's default stream has handle
// 0): a real stream that is always recorded and waited on, never "no stream".
// The bindings resolve their own sentinel (-1: the current torch stream)
// before calling in here.
#pragma once

#include <cstdint>
#include <memory>

namespace sampa_cuda {

// One direction src -> dst of ordered copies between two flat buffers; see the
// ordering model at the top of sampa_fused_cuda.cu.
struct LinkImpl;

// CUDA devices visible; 0 when there is no driver or device.
int device_count();
// True when each of a and b can access the other's memory (always for a == b).
bool can_access_peer(int a, int b);
// Enable peer access both ways, once per pair; false when the devices cannot.
bool enable_peer_access(int a, int b);

// src_stream (on src) carries peer / device-to-device copies and the
// device-to-host half of staged ones; dst_stream (on dst) the host-to-device
// half. staged forces copies through staging_bytes of pinned host memory
// (two slots); without peer access they are staged anyway.
std::shared_ptr<LinkImpl> link_create(int src, int dst, void* src_stream, void* dst_stream,
                                      bool staged, int64_t staging_bytes);
// 0: device-to-device (src == dst), 1: peer, 2: staged.
int link_mode(const LinkImpl& link);
// Bytes per staging slot (0 unless staged).
int64_t link_slot_bytes(const LinkImpl& link);
// Later copies write dst only after what `reader_stream` (on dst) has queued.
void link_begin(LinkImpl& link, void* reader_stream);
// Copy nbytes of src (on the link's src device) to dst (on its dst device),
// after what `producer_stream` (on src) has queued.
void link_copy(LinkImpl& link, void* dst, const void* src, int64_t nbytes, void* producer_stream);
// `consumer_stream` (on dst) waits for every copy to have landed in dst;
// `owner_stream` (on src) waits until they have read src.
void link_finish(LinkImpl& link, void* consumer_stream, void* owner_stream);

// One plain cudaMemcpyAsync / cudaMemcpyPeerAsync on `stream` (a stream of
// src_device): the benchmarks' reference for the link.
void memcpy_async(void* dst, int dst_device, const void* src, int src_device, int64_t nbytes,
                  void* stream);

}  // namespace sampa_cuda
