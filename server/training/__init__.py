"""Training: fit prefixes against the frozen base model (trainer) as durable background jobs (jobs, worker)."""

from server.training.config import (
    DEFAULT_METHOD,
    DEFAULT_PREFIX_LENGTH,
    DEFAULTS,
    METHODS,
    Hyperparameters,
    InitFromNotFound,
    TrainingCancelled,
    TrainingLimits,
    TrainingValidationError,
    default_hyperparameters,
    load_examples,
    parse_request,
)
from server.training.jobs import JobManager
from server.training.records import IdempotencyKeyReused, JobNotFound, JobRecord, TooManyJobs
from server.training.trainer import TrainingDiverged, TrainResult, train_prefix
from server.training.worker import run_worker, worker_main

__all__ = [
    "DEFAULTS",
    "DEFAULT_METHOD",
    "DEFAULT_PREFIX_LENGTH",
    "METHODS",
    "Hyperparameters",
    "IdempotencyKeyReused",
    "InitFromNotFound",
    "JobManager",
    "JobNotFound",
    "JobRecord",
    "TooManyJobs",
    "TrainResult",
    "TrainingCancelled",
    "TrainingDiverged",
    "TrainingLimits",
    "TrainingValidationError",
    "default_hyperparameters",
    "load_examples",
    "parse_request",
    "run_worker",
    "train_prefix",
    "worker_main",
]
