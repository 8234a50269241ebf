"""The stand-in CUDA itself (tests/fake_cuda.py): it must catch what a GPU
would get wrong, or the engine tests that use it prove nothing."""
import pytest
import torch
from fake_cuda import CaptureError, StreamOrderError, fake_cuda

from sampa_fused import _cuda


def test_runtime_is_swapped_and_restored():
    real = _cuda.runtime()
    with fake_cuda(devices=2) as rt:
        assert _cuda.runtime() is rt and _cuda.available() and _cuda.device_count() == 2
        assert _cuda.logical(torch.device("cpu")) == torch.device("cuda", 0)
        assert _cuda.physical(torch.device("cuda:1")) == torch.device("cpu")
        assert _cuda.handle(_cuda.current_stream(0)) == 0          # the default stream is null
    assert _cuda.runtime() is real


def test_unordered_write_then_read_on_another_stream_is_caught():
    with fake_cuda() as rt:
        s1, s2 = rt.Stream(0), rt.Stream(0)
        buf = torch.zeros(100)
        s1.wait_stream(rt.current_stream(0))
        s2.wait_stream(rt.current_stream(0))
        with rt.stream(s1):
            buf[10:20].fill_(1.0)
        with rt.stream(s2):
            buf[30:40].fill_(2.0)              # another slice: no conflict
            with pytest.raises(StreamOrderError, match=r"aten\.sum on stream .* reads .*aten\.fill_ on stream"):
                buf[15:25].sum()


def test_wait_stream_and_events_order_the_streams():
    with fake_cuda() as rt:
        s1, s2 = rt.Stream(0), rt.Stream(0)
        buf = torch.zeros(8)
        for s in (s1, s2):
            s.wait_stream(rt.current_stream(0))
        with rt.stream(s1):
            buf.add_(1.0)
        ev = s1.record_event()
        s2.wait_event(ev)
        with rt.stream(s2):
            buf.mul_(3.0)                      # ordered after s1's add
        with pytest.raises(StreamOrderError, match="writes"):
            with rt.stream(s1):
                buf.zero_()                    # s1 never waited for s2's mul
        rt.current_stream(0).wait_stream(s2)
        assert torch.equal(buf, torch.full((8,), 3.0))


def test_read_then_unordered_write_is_caught():
    with fake_cuda() as rt:
        s1 = rt.Stream(0)
        x = torch.ones(4)
        s1.wait_stream(rt.current_stream(0))
        with rt.stream(s1):
            y = x * 2                          # s1 reads x
        with pytest.raises(StreamOrderError, match="aten.zero_ on default stream"):
            x.zero_()                          # the default stream overwrites it unordered
        del y


def test_host_read_needs_the_producing_stream_ordered():
    with fake_cuda() as rt:
        s1 = rt.Stream(0)
        s1.wait_stream(rt.current_stream(0))
        with rt.stream(s1):
            flag = torch.ones(2) * 3
        with pytest.raises(StreamOrderError, match="host read"):
            flag.tolist()                      # read on the default stream, not ordered after s1
        rt.current_stream(0).wait_stream(s1)
        assert flag.tolist() == [3.0, 3.0]


def test_backward_runs_on_the_forward_stream_and_the_caller_waits():
    with fake_cuda() as rt:
        side = rt.Stream(0)
        w = torch.randn(5, requires_grad=True)
        w.grad = torch.zeros(5)
        side.wait_stream(rt.current_stream(0))
        with rt.stream(side):
            loss = (w * w).sum()
        loss.backward()                        # the mul's backward runs on `side`
        assert torch.equal(w.grad, 2 * w.detach())   # the caller waited for it at the end


def test_capture_records_without_changing_anything_and_replays():
    with fake_cuda() as rt:
        s = rt.Stream(0)
        x = torch.arange(6.0)
        table = torch.tensor([2.0])
        g = rt.CUDAGraph()
        with rt.graph(g, s):
            x.mul_(table)
            y = x + 1
        assert torch.equal(x, torch.arange(6.0))          # a capture runs nothing
        g.replay()
        assert torch.equal(x, torch.arange(6.0) * 2) and torch.equal(y, x + 1)
        table.fill_(10.0)                                   # read by address at every replay
        g.replay()
        assert torch.equal(x, torch.arange(6.0) * 20) and torch.equal(y, x + 1)


def test_capture_refuses_host_reads_and_unjoined_streams():
    with fake_cuda() as rt:
        s, side = rt.Stream(0), rt.Stream(0)
        x = torch.ones(3)
        with pytest.raises(CaptureError, match="capturing"):
            with rt.graph(rt.CUDAGraph(), s):
                (x * 2).sum().item()
        with pytest.raises(CaptureError, match="not joined"):
            with rt.graph(rt.CUDAGraph(), s):
                side.wait_stream(s)            # forks into the capture ...
                with rt.stream(side):
                    x.add_(1)                  # ... and is never joined back
        assert torch.equal(x, torch.ones(3))


def test_peer_link_orders_its_copies():
    for staged in (False, True):
        with fake_cuda(devices=2) as rt:
            src_s, dst_s = rt.Stream(0), rt.Stream(1)
            link = rt.peer_link(0, 1, src_s, dst_s, staged, 64)
            producer = rt.Stream(0)
            src = torch.zeros(100)
            with rt.device(1):
                dst = torch.zeros(100)
            producer.wait_stream(rt.current_stream(0))
            with rt.stream(producer):
                src.copy_(torch.arange(100.0))
            link.begin(-1)
            link.copy(dst, src, 3, 97, producer.cuda_stream)
            with pytest.raises(StreamOrderError), rt.device(1):
                dst.sum()                      # read before finish(): the copy may not have landed
            link.finish(-1, -1)
            with rt.device(1):
                total = dst.sum()              # cuda:1's current stream waited for the copies
            assert float(total) == float(torch.arange(3.0, 97.0).sum())
