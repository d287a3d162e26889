"""Lightning callbacks shared by all systems."""

from ldm.callbacks.data_monitor import DataSkipMonitor

__all__ = ["DataSkipMonitor"]
