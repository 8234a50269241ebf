"""sampa-fused: SAMPa (sharpness-aware minimization, parallelized) and SAM as
drop-in PyTorch optimizers over flat parameter buffers."""
from .optim import SAM, SAMPa

__all__ = ["SAMPa", "SAM"]
__version__ = "0.1.0"
