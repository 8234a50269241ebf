"""engines/distributed/status: the per-pass message (every rank's status row,
the `got` bytes, rank 0's buffers) combines by a byte-wise MAX, and the
host's View reads back bit for bit what each rank wrote."""
import torch

from sampa_fused.engines.distributed import status as st

WORLD, N_PARAMS, N_GROUPS, BUF = 2, 5, 2, 24
# per rank: FAILED, SEQ, HELD, NEW, BUF_BYTES, BUF_DIGEST, HAS_CHECKSUM, LOADED, BUF_SENT, 2 digests
HOST = [[0, 7, 11, 12, 24, 2.0 ** 40 + 3, 0, 0, 1, 0.1, -1 / 3],
        [1, 7, 11, 13, 24, 2.0 ** 40 + 3, 0, 1, 0, 0.1, 2.5]]
LOSS = [1.25, -0.7]
GOT = [[True, False, False, True, False], [False, False, True, True, False]]


def _messages():
    msgs = [st.Message(WORLD, N_PARAMS, N_GROUPS, BUF, torch.device("cpu")) for _ in range(WORLD)]
    for r, m in enumerate(msgs):
        assert m.row == st.ROW + N_GROUPS and len(HOST[r]) == m.row - st.HOST
        m.clear_rows()
        m.fill(r, torch.tensor(LOSS[r]), torch.tensor([9.0, r + 0.5, 1e300], dtype=torch.float64),
               None, HOST[r], GOT[r], reset_got=True)
    msgs[0].buffers.copy_(torch.arange(BUF, dtype=torch.uint8) * 7)   # rank 0's buffers only
    return msgs


def _check(view):
    assert view.field(st.LOSS) == [torch.tensor(v).double().item() for v in LOSS]
    assert [r[st.BATCH_FP] for r in view.rows] == [[9.0, 0.5, 1e300], [9.0, 1.5, 1e300]]
    assert view.failed == [1]
    assert view.seqs == [7, 7]
    assert view.batches == [(11, 12), (11, 13)]
    assert view.hyper(0) == [0.1, -1 / 3] and view.hyper(1) == [0.1, 2.5]   # bit for bit
    assert view.field(st.BUF_DIGEST) == [2.0 ** 40 + 3] * 2
    assert view.got == [a or b for a, b in zip(*GOT)]


def test_an_all_reduce_max_gathers_every_row_and_carries_rank0s_buffers():
    msgs = _messages()
    reduced = torch.maximum(msgs[0].flat, msgs[1].flat)     # what all_reduce(MAX) on uint8 gives
    for m in msgs:
        m.flat.copy_(reduced)
    for m in msgs:
        _check(st.View([m], [m.host_head()], owner=[0, 0]))
        assert torch.equal(m.buffers, torch.arange(BUF, dtype=torch.uint8) * 7)


def test_a_send_recv_pair_reads_each_row_from_its_writer():
    msgs = _messages()
    _check(st.View(msgs, [m.host_head() for m in msgs], owner=[0, 1]))


def test_got_bytes_are_rewritten_after_a_reduce_only_when_asked():
    m = _messages()[0]
    m.got.fill_(1)                                      # as if reduced with a peer's
    m.fill(0, None, None, None, HOST[0], GOT[0], reset_got=False)
    assert m.got.tolist() == [1] * N_PARAMS             # unchanged want: not rewritten
    assert m.rows[0][st.LOSS].item() == 0.0             # no loss: 0
    m.fill(0, None, None, None, HOST[0], GOT[0], reset_got=True)
    assert m.got.tolist() == [int(v) for v in GOT[0]]
