"""engine="distributed": SAMPa's two passes on the two halves of a
torch.distributed group (see engine.py); sharding, the status protocol, the
fingerprint check and the packing of small tensors have modules of their own."""
from ..buckets import plan_buckets
from .engine import DEFAULT_TIMEOUT_S, DistributedEngine
from .sharding import batch_length, shard_batch

__all__ = ["DistributedEngine", "DEFAULT_TIMEOUT_S", "plan_buckets", "batch_length", "shard_batch"]
