"""Lightning callbacks shared by all systems."""

from ldm.callbacks.data_monitor import DataSkipMonitor
from ldm.callbacks.evaluation import GenerationEvalCallback
from ldm.callbacks.reconstructions import ReconstructionLogger
from ldm.callbacks.samples import SampleLogger

__all__ = ["DataSkipMonitor", "GenerationEvalCallback", "ReconstructionLogger", "SampleLogger"]
