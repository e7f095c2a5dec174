"""make_strategy("fedavg", **cfg): build a strategy by name, like timm's create_model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hub.fl.errors import StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.fedbn import FedBN
from hub.fl.fedhelp import FedHelp
from hub.fl.fedprox import FedProx
from hub.fl.head_averaging import HeadAveraging
from hub.fl.hsl import HSL
from hub.fl.pfednet import PFedNet
from hub.fl.privacy import DifferentialPrivacy
from hub.fl.robust import Robust, RobustMethod
from hub.fl.strategy import Strategy

__all__ = ["STRATEGIES", "available_strategies", "make_strategy"]

#: Strategy name -> class; every class has explicit keyword-only constructor arguments (see its docstring).
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedBN, HSL, FedHelp, PFedNet, HeadAveraging)
}


def available_strategies() -> list[str]:
    """Names accepted by ``make_strategy``, sorted."""
    return sorted(STRATEGIES)


def make_strategy(
    name: str,
    *,
    robust: RobustMethod | None = None,
    trim_beta: float = 0.1,
    dp_clip_norm: float | None = None,
    dp_noise_multiplier: float | None = None,
    dp_delta: float = 1e-5,
    **cfg: Any,
) -> Strategy:
    """A new strategy of this name built with the keyword settings ``cfg`` (the class's own arguments).

    ``robust`` (a ``RobustMethod``: ``"median"``, ``"trimmed_mean"`` with ``trim_beta``, ``"norm_filter"``,
    ``"norm_filter_weighted"``, ``"norm_bound"``, ``"norm_bound_trimmed"``, ``"audited"``) wraps it in
    ``Robust``;
    ``dp_clip_norm`` together with ``dp_noise_multiplier`` wraps it in ``DifferentialPrivacy`` (not both).
    Unknown names and unknown or invalid settings raise ``StrategyConfigError`` naming the problem.
    """
    factory = STRATEGIES.get(name.lower())
    if factory is None:
        raise StrategyConfigError(f"unknown strategy {name!r}; choose one of {available_strategies()}")
    try:
        strategy = factory(**cfg)
    except TypeError as exc:
        raise StrategyConfigError(f"strategy {name!r}: bad settings {sorted(cfg)}: {exc}") from exc
    wants_dp = dp_clip_norm is not None or dp_noise_multiplier is not None
    if robust is not None and wants_dp:
        raise StrategyConfigError("choose robust aggregation or differential privacy, not both")
    if robust is not None:
        return Robust(strategy, robust, trim_beta)
    if wants_dp:
        if dp_clip_norm is None or dp_noise_multiplier is None:
            raise StrategyConfigError("differential privacy needs both dp_clip_norm and dp_noise_multiplier")
        return DifferentialPrivacy(
            strategy, clip_norm=dp_clip_norm, noise_multiplier=dp_noise_multiplier, delta=dp_delta
        )
    return strategy
