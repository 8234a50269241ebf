"""sampa-fused: SAMPa (sharpness-aware minimization, parallelized) and SAM as
drop-in PyTorch optimizers over flat parameter buffers."""
from .batching import MicroBatches
from .optim import SAM, SAMPa
from .sharded import ShardedSAM, ShardedSAMPa, shard

__all__ = ["SAMPa", "SAM", "MicroBatches", "ShardedSAMPa", "ShardedSAM", "shard"]
__version__ = "0.2.0"
