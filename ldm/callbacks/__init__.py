"""Lightning callbacks shared by all systems."""

from ldm.callbacks.data_monitor import DataSkipMonitor
from ldm.callbacks.divergence import DivergenceGuard
from ldm.callbacks.ema import EMA, EMAWarmup
from ldm.callbacks.evaluation import GenerationEvalCallback
from ldm.callbacks.reconstructions import ReconstructionLogger
from ldm.callbacks.samples import SampleLogger
from ldm.callbacks.speed import Speedups
from ldm.callbacks.step_seed import StepSeed

__all__ = ["DataSkipMonitor", "DivergenceGuard", "EMA", "EMAWarmup", "GenerationEvalCallback", "ReconstructionLogger", "SampleLogger", "Speedups",
           "StepSeed"]
