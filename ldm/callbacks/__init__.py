"""Lightning callbacks shared by all systems."""

from ldm.callbacks.data_monitor import DataSkipMonitor
from ldm.callbacks.reconstructions import ReconstructionLogger

__all__ = ["DataSkipMonitor", "ReconstructionLogger"]
