"""Training and evaluation orchestration, above the models, the data and the infrastructure in ``utils``.

- ``loops``: ``train_step`` (one optimisation step, used by training and the benchmark), ``train_one_epoch``,
  ``evaluate``;
- ``optim``: the official AdamW parameter groups and polynomial learning-rate schedule;
- ``trainer``: ``train`` (epochs, validation, checkpoints) and ``load_pretrained``;
- ``checkpointing``: what ``last.pth`` holds and when it is written; ``resume``: continuing a run from it
  (``plan_resume`` checks before anything is written); ``preemption``: SIGTERM / SIGUSR1 / Ctrl-C /
  ``request_checkpoint`` -> checkpoint and ``Preempted``; ``checkpoint_config``: whether a checkpoint's
  configuration fits a run;
- ``run_folder``: ``prepare_run_dir``, the folder a run writes into (owned by one run, locked while it trains);
- ``evaluation``: ``run_evaluation`` over the configured splits, and the names of the files it writes;
- ``synthetic_once``: the synthetic dataset made once for the runs that share its root.
"""

from .evaluation import run_evaluation
from .loops import NonFiniteLossError, evaluate, train_one_epoch, train_step
from .optim import build_lr_scheduler, build_optimizer, poly_lr_lambda
from .preemption import Preempted, request_checkpoint
from .resume import plan_resume
from .run_folder import RunFolderError, prepare_run_dir
from .trainer import load_pretrained, seed_everything, train

__all__ = [
    "NonFiniteLossError",
    "Preempted",
    "RunFolderError",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate",
    "load_pretrained",
    "plan_resume",
    "poly_lr_lambda",
    "prepare_run_dir",
    "request_checkpoint",
    "run_evaluation",
    "seed_everything",
    "train",
    "train_one_epoch",
    "train_step",
]
