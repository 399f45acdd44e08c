"""Block reconstruction building blocks (docs/algorithm.md §7): settings, AdaRound, data, blocks.

The driver is :func:`adalog.pipelines.reconstruct.reconstruct` (``adalog.reconstruct``).
"""

from adalog.recon.adaround import AdaRoundQuantizer
from adalog.recon.config import ReconstructConfig

__all__ = ["AdaRoundQuantizer", "ReconstructConfig"]
