"""Training: the losses of condiff's networks (:mod:`.tasks`), the loop (:mod:`.loop`),
weight averages and post-hoc EMA (:mod:`.ema`), and run-folder guards (:mod:`.guard`).

* :class:`DiffusionTask`  eps-MSE of eq 22 with condition dropout to the learned null
  phi (eq 24), optional min-SNR-gamma weighting and stratified t.
* :class:`ClassifierTask` cross-entropy of a noise-aware classifier p(y|x_t) (eqs 1-8).
* :func:`train`           any task, resumable bit-identically, one trainer per folder.
"""

from .ema import EMA, gamma_to_sigma_rel, list_snapshots, posthoc_ema, posthoc_weights, save_posthoc_ema, sigma_rel_to_gamma
from .guard import RunLock, RunLocked, StopSignals, TrainingStopped
from .loop import LR_SCHEDULES, MetricsLog, TrainConfig, TrainState, ema_model, lr_lambda, restore, save, train, train_step
from .tasks import (T_RANGES, T_SAMPLING, ClassifierTask, DiffusionTask, classifier_accuracy_by_t, min_snr_weight,
                    sample_t)

__all__ = ["TrainConfig", "DiffusionTask", "ClassifierTask", "train", "ema_model", "classifier_accuracy_by_t",
           "T_RANGES", "T_SAMPLING", "LR_SCHEDULES", "lr_lambda", "min_snr_weight", "sample_t", "EMA",
           "sigma_rel_to_gamma", "gamma_to_sigma_rel", "posthoc_weights", "posthoc_ema", "save_posthoc_ema",
           "list_snapshots", "RunLock", "RunLocked", "StopSignals", "TrainingStopped", "TrainState", "MetricsLog",
           "restore", "save", "train_step"]
