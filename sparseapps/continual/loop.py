"""The loop every continual strategy shares: train an experience, evaluate every task seen so far.

:func:`train_and_evaluate` fills the accuracy matrix ``R[i][j]`` (accuracy on task ``j`` after training task
``i``) for any Avalanche ``SupervisedTemplate`` (the benchmark script runs ours, Naive, EWC, LwF and PackNet
through it). Metrics (REFERENCES.md): ``ACC = mean_j R[T-1][j]``; ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])``;
Avalanche's forgetting is ``-BWT``. Task-agnostic accuracy (no task labels at test time, task inferred per sample
by the lowest-entropy head) is :func:`evaluate_task_agnostic`.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from sparseapps.continual.benchmarks import Benchmark
from sparseapps.continual.models import TaskAwareModule
from sparseapps.continual.plugin import experience_task
from sparseapps.continual.resume import Checkpoints, Record

_ACCURACY_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task(\d+)/Exp(\d+)$")


def check_streams(benchmark: Benchmark) -> None:
    """Checks that train and test experience ``j`` share one task label and one class set.

    Raises:
        ValueError: different lengths, missing or differing task labels, or different class sets.
    """
    train, test = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(train) != len(test):
        raise ValueError(
            f"streams: expected as many test as train experiences, got {len(test)} and {len(train)}"
        )
    for index, (train_exp, test_exp) in enumerate(zip(train, test, strict=True)):
        train_task, test_task = experience_task(train_exp), experience_task(test_exp)
        if train_task != test_task:
            raise ValueError(
                f"experience {index}: expected one task label in train and test, got {train_task} and {test_task}"
            )
        train_classes = sorted(int(c) for c in train_exp.classes_in_this_experience)
        test_classes = sorted(int(c) for c in test_exp.classes_in_this_experience)
        if train_classes != test_classes:
            raise ValueError(
                f"experience {index} (task {train_task}): expected the same classes in train and test, got "
                f"{train_classes} and {test_classes}"
            )


def stream_metrics(matrix: Sequence[Sequence[float | None]]) -> dict[str, float]:
    """ACC, BWT and forgetting of a lower-triangular accuracy matrix ``R[i][j]`` (``j <= i``).

    Example:
        >>> stream_metrics([[0.9, None], [0.8, 0.7]])
        {'acc': 0.75, 'bwt': -0.09999999999999998, 'forgetting': 0.09999999999999998}
    """
    n = len(matrix)
    if n == 0 or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix: expected a square T x T matrix with T >= 1, got {len(matrix)} rows")
    last = [matrix[n - 1][j] for j in range(n)]
    if any(value is None for value in last) or any(matrix[j][j] is None for j in range(n)):
        raise ValueError("matrix: expected R[T-1][j] and R[j][j] for every task j")
    acc = statistics.fmean(float(v) for v in last)  # type: ignore[arg-type]
    bwt = statistics.fmean(last[j] - matrix[j][j] for j in range(n - 1)) if n > 1 else 0.0  # type: ignore[operator]
    return {"acc": acc, "bwt": bwt, "forgetting": -bwt if bwt else 0.0}


def train_and_evaluate(
    strategy: Any,
    benchmark: Benchmark,
    *,
    progress: bool = True,
    description: str = "tasks",
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Trains ``strategy`` on each experience and evaluates every seen task after each one.

    Args:
        strategy: an Avalanche ``SupervisedTemplate`` whose evaluator holds experience accuracy (e.g.
            :func:`~sparseapps.continual.plugin.continual_evaluator`).
        benchmark: the benchmark (task-incremental).
        progress: show a tqdm bar over tasks.
        description: the bar's label.
        checkpoints: the strategy's :class:`~sparseapps.continual.resume.Checkpoints` plugin: training starts
            where its checkpoint left off and a checkpoint follows every task.

    Returns:
        ``{"accuracy_matrix": R (None above the diagonal), "acc", "bwt", "forgetting", "bwt_exact_zero",
        "train_seconds": [per task], "avalanche": {final stream metrics}}``.
    """
    from tqdm import tqdm

    check_streams(benchmark)
    n = benchmark.n_tasks
    record = checkpoints.record if checkpoints is not None else Record.empty(n)
    matrix = record.accuracy_matrix
    start = len(record.train_seconds)
    if checkpoints is not None:
        checkpoints.resume(strategy)
    bar = tqdm(total=n, initial=start, desc=description, unit="task", disable=not progress, leave=False)
    for i in range(start, n):
        record.task_started = time.perf_counter() - record.task_elapsed_seconds
        record.task_elapsed_seconds = 0.0
        strategy.train(benchmark.train_stream[i], eval_streams=[])
        record.train_seconds.append(time.perf_counter() - record.task_started)
        final = strategy.eval(benchmark.test_stream[: i + 1])
        found = {}
        for key, value in final.items():
            match = _ACCURACY_KEY.match(key)
            if match:
                found[int(match.group(2))] = float(value)
        missing = [j for j in range(i + 1) if j not in found]
        if missing:
            raise ValueError(
                f"strategy evaluator: expected experience accuracy (accuracy_metrics(experience=True)) for "
                f"experiences {missing}, got keys {sorted(final)[:5]}"
            )
        for j in range(i + 1):
            matrix[i][j] = found[j]
        record.avalanche = {
            name: float(final[key])
            for name, key in (
                ("stream_forgetting", "StreamForgetting/eval_phase/test_stream"),
                ("stream_bwt", "StreamBWT/eval_phase/test_stream"),
            )
            if key in final
        }
        if checkpoints is not None:
            checkpoints.save(strategy)
        bar.update()
        bar.set_postfix(acc=f"{statistics.fmean(found[j] for j in range(i + 1)):.3f}")
    bar.close()
    metrics = stream_metrics(matrix)
    return {
        "accuracy_matrix": matrix,
        **metrics,
        "bwt_exact_zero": all(matrix[n - 1][j] == matrix[j][j] for j in range(n)),
        "train_seconds": list(record.train_seconds),
        "avalanche": dict(record.avalanche),
    }


@torch.no_grad()
def evaluate_task_agnostic(
    model: TaskAwareModule,
    benchmark: Benchmark,
    tasks: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy without task labels: per sample, the task is inferred (lowest-entropy head) among ``tasks``.

    Returns:
        ``{"accuracy": right task and right label, "task_inference_accuracy": right task}`` over all test
        samples of the experiences whose task is in ``tasks``.
    """
    was_training = model.training
    model.eval()
    correct = inferred = total = 0
    for experience in benchmark.test_stream:
        task = experience_task(experience)
        if task not in tasks:
            continue
        loader = DataLoader(experience.dataset.eval(), batch_size=batch_size, shuffle=False)
        for x, y, t in loader:
            x, y, t = x.to(device), y.to(device), t.to(device)
            predicted_task, predicted_label = model.predict_task_agnostic(x, list(tasks))
            right_task = predicted_task == t
            inferred += int(right_task.sum())
            correct += int((right_task & (predicted_label == y)).sum())
            total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError(f"tasks: expected test experiences of tasks {list(tasks)}, found none")
    return {"accuracy": correct / total, "task_inference_accuracy": inferred / total}


__all__ = ["check_streams", "evaluate_task_agnostic", "stream_metrics", "train_and_evaluate"]
