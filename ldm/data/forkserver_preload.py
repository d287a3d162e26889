"""What the data-loader workers' fork server imports when it starts (:func:`ldm.data.workers.worker_context`).

Imported there only, never by a training process: the fork server ignores SLURM's preemption signals
(USR1, SIGTERM are sent to every process of a job step; a fork server killed by them would take its
workers with it: their watchdog ends a worker whose parent is gone, and the training process would fail
on its next batch before it could checkpoint). It ends when the training process does (its pipe closes).
Workers are forked from it with torch and the data modules already imported.
"""

import signal

import torch  # noqa: F401  (imported once, here, for every worker)

import ldm.data.streams  # noqa: F401  (what the workers' streams are made of)
from ldm.data.workers import PREEMPTION_SIGNALS

for _signum in PREEMPTION_SIGNALS:
    signal.signal(_signum, signal.SIG_IGN)
