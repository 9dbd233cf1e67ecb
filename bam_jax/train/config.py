"""Training hyperparameters, as one gin-configurable record (bound by gin/seed.gin etc.)."""

from __future__ import annotations

import dataclasses
import re

import gin

from bam_jax.errors import BamJaxError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. The gin macros TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, LEARNING_RATE bind here."""
    train_steps: int = 1000
    batch_size: int = 32              # global, in sequences, across all hosts
    seq_len: int = 256
    learning_rate: float = 3e-4       # peak
    lr_multiplier: float = 1.0        # branch runs use 0.5: half the seed's peak, as in BAM/BTX
    warmup_steps: int = 100
    end_lr_fraction: float = 0.1      # cosine decay to 10% of the peak
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1         # micro-batches per optimizer step
    seed: int = 0                     # parameter init and data order
    init_checkpoint: str | None = None   # restore parameters only (not optimizer state)
    init_required: bool = False       # set by branch.gin: refuse to start from random weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    log_every: int = 10
    stop_at_step: int | None = None   # end this invocation early (checkpointed); resume later
    # Lory only: train this fraction of train_steps as the dense model first (train/dense_warmup.py).
    dense_warmup_fraction: float = 0.0
    # Length from a budget instead of train_steps (bam_jax/train/budget.py):
    flops_budget: float | None = None   # total training FLOPs
    match_run: str | None = None        # a run's workdir to match ...
    match: str = 'tokens'               # ... in 'tokens' (data-matched) or 'flops' (compute-matched)
    # A regular expression over parameter paths (layers/0/ffn/router/kernel): only the parameters
    # it matches (re.search) train, the others keep their restored values and have no optimizer
    # state. '' trains every one. gin/mix_router_only.gin trains the routers alone.
    trainable: str = ''

    def __post_init__(self):
        positive = ('train_steps', 'batch_size', 'seq_len', 'grad_accum_steps',
                    'checkpoint_every', 'keep_checkpoints', 'eval_every', 'log_every')
        for name in positive:
            if getattr(self, name) <= 0:
                raise BamJaxError(f'TrainConfig.{name} must be positive, got {getattr(self, name)}')
        if self.batch_size % self.grad_accum_steps:
            raise BamJaxError(f'batch size {self.batch_size} is not divisible by '
                              f'grad_accum_steps {self.grad_accum_steps}')
        if self.flops_budget is not None and not 0 < self.flops_budget < float('inf'):
            raise BamJaxError(f'TrainConfig.flops_budget must be positive, got {self.flops_budget}')
        if not 0 <= self.dense_warmup_fraction < 1:
            raise BamJaxError(f'TrainConfig.dense_warmup_fraction must be in [0, 1), got {self.dense_warmup_fraction}')
        if self.learning_rate <= 0:
            raise BamJaxError(f'learning rate must be positive, got {self.learning_rate}')
        try:
            re.compile(self.trainable)
        except re.error as e:
            raise BamJaxError(f'TrainConfig.trainable {self.trainable!r} is not a regular expression: {e}') from None

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate * self.lr_multiplier
