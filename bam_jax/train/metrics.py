"""Run metrics: a JSON file in the workdir, TensorBoard scalars, and the console table."""

from __future__ import annotations

import json
import math

import jax
import numpy as np

from bam_jax import storage
from bam_jax.workdir import files, write_json_atomic


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float('inf')


class MetricsLog:
    """Appends train and eval records to workdir/metrics.json and TensorBoard (process 0 only),
    and the model settings changed at a resume ('settings': [{'step', 'changed': {setting:
    [before, after]}}]).

    On resume, records after the restored step are dropped so the log matches the state.
    """

    def __init__(self, workdir: storage.Path, resume_step: int):
        self.path = storage.path(workdir) / files.METRICS
        self.enabled = jax.process_index() == 0
        self.records = {'train': [], 'eval': [], 'settings': []}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                self.records = {k: [r for r in old.get(k, []) if r['step'] <= resume_step]
                                for k in self.records}
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a damaged log is replaced, never fatal
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(storage.path(workdir) / files.TENSORBOARD))

    def train(self, step: int, values: dict[str, float]) -> None:
        self._add('train', step, values)

    def eval(self, step: int, per_domain: dict[str, dict[str, float]]) -> None:
        flat = {f'{domain}/{k}': v for domain, d in per_domain.items() for k, v in d.items()}
        self._add('eval', step, flat)

    def settings_changed(self, step: int, changed: dict[str, list]) -> None:
        """Records the model settings that differ from the checkpoint this invocation resumed."""
        if self.enabled:
            self.records['settings'].append({'step': step, 'changed': changed})
            write_json_atomic(self.path, self.records)

    def _add(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.records[kind].append({'step': step, **values})
        for name, value in values.items():
            self._writer.add_scalar(f'{kind}/{name}', value, step)
        self._writer.flush()
        write_json_atomic(self.path, self.records)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def router_scalars(router: dict) -> dict[str, float]:
    """{layer: router_aux} -> flat scalars 'router/<layer>/<name>', with 'load' per expert."""
    flat = {}
    for layer, values in router.items():
        for name, value in values.items():
            if name == 'loss':
                continue
            value = np.asarray(value)
            if value.ndim:
                flat.update({f'router/{layer}/{name}/{i}': float(v) for i, v in enumerate(value)})
            else:
                flat[f'router/{layer}/{name}'] = float(value)
    return flat


def per_domain(validation: dict) -> dict[str, dict[str, float]]:
    """A validation result (bam_jax.train.validation.validate) as {domain: {'loss', 'perplexity'}},
    with 'average' the mean of the domains' losses and of their perplexities."""
    losses = validation['loss']
    table = {d: {'loss': loss, 'perplexity': validation['perplexity'][d]} for d, loss in losses.items()}
    if losses:
        table['average'] = {'loss': float(np.mean(list(losses.values()))),
                            'perplexity': validation['perplexity']['average']}
    return table


def format_eval_table(per_domain: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: domain, loss, perplexity."""
    lines = [f'{"domain":<12} {"loss":>8} {"ppl":>10}']
    for domain, values in per_domain.items():
        lines.append(f'{domain:<12} {values["loss"]:>8.4f} {values["perplexity"]:>10.3f}')
    return '\n'.join(lines)
