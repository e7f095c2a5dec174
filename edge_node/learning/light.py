"""The light learner: a shared and a personal linear head on the frozen backbone's embedding (numpy only).

On the embedding ``e`` the bundle outputs, the shared head ``(W_s, b_s)`` is the federation's (the hub sends
it) and the personal head ``(W_p, b_p)`` is the clinic's own, kept on the node; the node serves
``logits = model_logits + e @ W_p.T + b_p``, where ``model_logits`` is the bundle's own (shared) head. One
round trains in two steps, each by Adam on seeded mini-batches over the node's labeled examples:

1. the shared head, with the current personal head in place, held near the head that was sent:
   mean CE(e @ (W_s + W_p).T + b_s + b_p) + (mu / 2)·‖(W_s, b_s) − (W_s⁰, b_s⁰)‖²;
2. the personal head, on top of what the node serves, warm-started from the last round's:
   mean CE(model_logits + e @ W_p.T + b_p) + (lam / 2)·‖(W_p, b_p)‖².

The update is the delta of the shared head only (pFedNet's split: a shared part averaged at the hub, a
personal part that never leaves); the personal head is exactly what the node then serves with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_node.learning.errors import LearningError
from edge_node.protocol.manifest import HeadSpec, TaskSpec

__all__ = ["HeadPair", "LightConfig", "LightLearner", "LightResult"]


@dataclass(frozen=True)
class LightConfig:
    """How the light learner trains; the hub may override each field by the task's ``config``."""

    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 0.03
    #: Proximal weight that holds the shared head near the one the hub sent.
    mu: float = 0.01
    #: Ridge weight that keeps the personal head small where the clinic's labels do not ask for it.
    lam: float = 0.005
    seed: int = 0
    #: Fewer labeled examples, or fewer of each class, and the node refuses the task rather than guess.
    min_examples: int = 10
    min_per_class: int = 3

    @classmethod
    def from_task(cls, config: Mapping[str, float | int | str | bool]) -> LightConfig:
        """Defaults overridden by the task's config keys of the same names (others are ignored)."""
        base = cls()
        values: dict[str, int | float] = {}
        for name in ("epochs", "batch_size", "seed", "min_examples", "min_per_class"):
            if name in config:
                v = config[name]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
                    raise LearningError(f"task config {name} must be a whole number ≥ 0, got {v!r}")
                values[name] = int(v)
        for name in ("learning_rate", "mu", "lam"):
            if name in config:
                v = config[name]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) < 1e6:
                    raise LearningError(f"task config {name} must be a number ≥ 0, got {v!r}")
                values[name] = float(v)
        merged = {**base.__dict__, **values}
        if merged["batch_size"] < 1 or merged["epochs"] < 1:
            raise LearningError("task config epochs and batch_size must be at least 1")
        return cls(**merged)


@dataclass(frozen=True)
class HeadPair:
    """A linear head: weight (K, D) and bias (K,), float64."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def zeros(cls, k: int, d: int) -> HeadPair:
        return cls(np.zeros((k, d)), np.zeros(k))


@dataclass(frozen=True)
class LightResult:
    #: Shared-head delta (after − sent) under the student's tensor names, float32: what leaves the node.
    shared_delta: dict[str, np.ndarray]
    #: The new personal head: stays on the node.
    personal: HeadPair
    loss_before: float
    loss_after: float
    num_examples: int


class _Adam:
    """Adam (Kingma & Ba) over a list of arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float) -> None:
        self.params, self.lr = params, lr
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + eps)


class LightLearner:
    """Trains the shared + personal head of one model on embeddings and labels."""

    def __init__(self, head: HeadSpec, task: TaskSpec, config: LightConfig | None = None) -> None:
        self.head, self.task = head, task
        self.config = config or LightConfig()
        k = head.num_outputs
        self.binary = task.output_activation == "sigmoid" and k == 1 and len(task.classes) == 2
        if not self.binary and not (task.output_activation == "softmax" and k == len(task.classes)):
            raise LearningError(
                f"the light learner trains one sigmoid logit (2 classes) or softmax over the classes; this "
                f"model has {k} outputs with {task.output_activation} for {len(task.classes)} classes"
            )

    def shared_from(self, params: Mapping[str, np.ndarray]) -> HeadPair:
        """The shared head from the task's params, checked against the bundle's head names and shapes."""
        out = []
        for spec in (self.head.weight, self.head.bias):
            arr = params.get(spec.name)
            if arr is None:
                raise LearningError(f"the task's params hold no {spec.name!r} (they hold {sorted(params)})")
            if list(arr.shape) != list(spec.shape) or not np.issubdtype(arr.dtype, np.floating):
                raise LearningError(
                    f"{spec.name!r} is {arr.dtype} {list(arr.shape)}; this model's head needs "
                    f"float {spec.shape}"
                )
            if not np.all(np.isfinite(arr)):
                raise LearningError(f"{spec.name!r} holds values that are not finite")
            out.append(np.asarray(arr, dtype=np.float64))
        return HeadPair(out[0], out[1])

    def check_labels(self, y: np.ndarray) -> None:
        """LearningError (the reason to refuse the task) when there are too few labels to learn from."""
        cfg = self.config
        if y.shape[0] < cfg.min_examples:
            raise LearningError(
                f"only {y.shape[0]} labeled examples on this node; the light learner needs {cfg.min_examples}"
            )
        counts = np.bincount(y, minlength=len(self.task.classes))
        if counts.min() < cfg.min_per_class:
            names = {c.index: c.name for c in self.task.classes}
            have = ", ".join(f"{names.get(i, i)}: {int(n)}" for i, n in enumerate(counts))
            raise LearningError(f"too few labels of some class ({have}); each needs {cfg.min_per_class}")

    def _targets(self, y: np.ndarray) -> np.ndarray:
        if self.binary:
            return (y == self.task.positive_class).astype(np.float64)[:, None]  # (N, 1)
        return np.eye(len(self.task.classes))[y]  # (N, K)

    def _data_loss_grad_z(self, z: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean cross-entropy of logits z (N, K) and its gradient with respect to them."""
        n = z.shape[0]
        if self.binary:
            # log(1 + exp(-|z|)) form: no overflow for large logits.
            loss = float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
            p = 0.5 * (1 + np.tanh(0.5 * z))  # sigmoid without overflow
            return loss, (p - t) / n
        shifted = z - z.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-np.mean(np.sum(t * logp, axis=1)))
        return loss, (np.exp(logp) - t) / n

    def _fit(
        self,
        e: np.ndarray,
        t: np.ndarray,
        offset: np.ndarray,
        head: HeadPair,
        anchor: HeadPair,
        weight_decay: float,
        rng: np.random.Generator,
    ) -> HeadPair:
        """Adam on mean CE of ``offset + e @ W.T + b`` plus (weight_decay / 2)·‖(W, c) − anchor‖².

        Optimised in centred coordinates, ``e @ W.T + b = (e − m) @ W.T + c`` with m the mean embedding and
        c = b + W m: embeddings after a ReLU are all positive, and without centring every step of W also
        moves the mean logit, which slows Adam to a crawl. The result is mapped back to (W, b).
        """
        cfg = self.config
        m = e.mean(axis=0)  # (D,)
        ec = e - m  # (N, D)
        w = head.weight.astype(np.float64, copy=True)  # (K, D)
        c = head.bias + head.weight @ m  # (K,)
        aw, ac = anchor.weight, anchor.bias + anchor.weight @ m
        opt = _Adam([w, c], cfg.learning_rate)
        n = e.shape[0]
        for _ in range(cfg.epochs):
            order = rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                eb = ec[idx]  # (B, D)
                _, dz = self._data_loss_grad_z(offset[idx] + eb @ w.T + c, t[idx])  # (B, K)
                gw, gc = dz.T @ eb, dz.sum(axis=0)  # (K, D), (K,)
                opt.step([gw + weight_decay * (w - aw), gc + weight_decay * (c - ac)])
        return HeadPair(w, c - w @ m)

    def loss(
        self, embeddings: np.ndarray, y: np.ndarray, served_logits: np.ndarray, personal: HeadPair
    ) -> float:
        """Mean cross-entropy of what the node serves, ``served_logits`` plus the personal head's logits."""
        e = np.asarray(embeddings, dtype=np.float64)
        return self._loss_grad(e, self._targets(y), personal.weight, personal.bias, served_logits)[0]

    def _loss_grad(
        self, e: np.ndarray, t: np.ndarray, w: np.ndarray, b: np.ndarray, offset: np.ndarray
    ) -> tuple[float, np.ndarray]:
        return self._data_loss_grad_z(offset + e @ w.T + b, t)

    def train(
        self,
        embeddings: np.ndarray,
        y: np.ndarray,
        shared: HeadPair,
        personal: HeadPair | None = None,
        served_logits: np.ndarray | None = None,
    ) -> LightResult:
        """Train on (N, D) embeddings and (N,) class indices; deterministic for ``config.seed``.

        ``served_logits`` (N, K): the model's own logits (the bundle's shared head), on top of which the
        personal head serves; None means the shared head that was sent.
        """
        e = np.asarray(embeddings, dtype=np.float64)  # (N, D)
        k, d = self.head.num_outputs, self.head.embedding_dim
        if e.ndim != 2 or e.shape[1] != d or y.shape != (e.shape[0],):
            raise LearningError(
                f"embeddings {list(e.shape)} and labels {list(y.shape)} do not fit a (N, {d}) head"
            )
        if not np.all(np.isfinite(e)):
            raise LearningError("the embeddings hold values that are not finite")
        self.check_labels(y)
        cfg = self.config
        personal = personal or HeadPair.zeros(k, d)
        if personal.weight.shape != (k, d) or personal.bias.shape != (k,):
            raise LearningError(f"the personal head {list(personal.weight.shape)} does not fit ({k}, {d})")
        served = e @ shared.weight.T + shared.bias if served_logits is None else served_logits
        served = np.asarray(served, dtype=np.float64).reshape(e.shape[0], k)  # (N, K)
        t = self._targets(y)
        rng = np.random.default_rng(cfg.seed)
        zero = HeadPair.zeros(k, d)
        before = self._loss_grad(e, t, personal.weight, personal.bias, served)[0]
        # 1. The shared head, with the clinic's current personal head in place, held near the federation's.
        new_shared = self._fit(e, t, e @ personal.weight.T + personal.bias, shared, shared, cfg.mu, rng)
        # 2. The personal head on top of what the node serves (the bundle's own head), ridge toward zero.
        new_personal = self._fit(e, t, served, personal, zero, cfg.lam, rng)
        after = self._loss_grad(e, t, new_personal.weight, new_personal.bias, served)[0]
        delta = {
            self.head.weight.name: (new_shared.weight - shared.weight).astype(np.float32),
            self.head.bias.name: (new_shared.bias - shared.bias).astype(np.float32),
        }
        return LightResult(delta, new_personal, before, after, int(e.shape[0]))
