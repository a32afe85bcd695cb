"""Privacy accounting for client-level DP on a group's averaged B.

Flower 1.42's fixed-clipping DP wrappers take a ``PrivacyAccountant`` (flwr.serverapp) and
compose one Gaussian event per released aggregate. Flower's ``RdpAccountant`` needs the
optional ``dp-accounting`` package (``pip install "flwr[dp]"``); when it is not installed this
module supplies the same protocol for the one case the group flow uses, in closed form:

- every member is sampled every round (SamplingMethod.NO_AMPLIFICATION) and neighbouring
  federations differ by adding or removing one client (ADD_OR_REMOVE_ONE);
- one round adds noise of std z C to the sum of updates clipped to C: the Gaussian mechanism
  with noise multiplier z, whose Renyi DP at order a is a / (2 z^2) (Mironov 2017, Prop. 7),
  and R rounds compose additively (Prop. 1);
- RDP -> (epsilon, delta) with the conversion of Canonne, Kamath & Steinke (2020, Prop. 12),
  epsilon = rdp(a) + log((a - 1) / a) - (log delta + log a) / (a - 1), minimised over the
  orders dp-accounting uses by default.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("seqr.server.groups")

# dp-accounting's default RDP orders (rdp_privacy_accountant.DEFAULT_RDP_ORDERS).
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])


def make_accountant(*, delta: float, population: int, max_epsilon: float | None) -> Any:
    """Flower's RdpAccountant when dp-accounting is installed, else GaussianRdpAccountant."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

    config = PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=max_epsilon,
    )
    try:
        from flwr.serverapp import RdpAccountant

        return RdpAccountant(config)
    except ImportError:
        log.info("dp-accounting is not installed: closed-form Gaussian RDP accountant")
        return GaussianRdpAccountant(config)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, best order) of ``releases`` Gaussian releases of noise multiplier z."""
    if releases == 0:
        return 0.0, math.nan
    best = (math.inf, math.nan)
    for a in ORDERS:
        rdp = releases * a / (2 * noise_multiplier**2)
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (max(eps, 0.0), a))
    return best


class GaussianRdpAccountant:
    """flwr.serverapp.PrivacyAccountant for Gaussian releases without sampling amplification."""

    def __init__(self, config: Any) -> None:
        from flwr.serverapp import SamplingMethod

        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("GaussianRdpAccountant covers no-amplification sampling only")
        self._config = config
        self._events: list[tuple[float, int]] = []  # (noise multiplier, count)

    @property
    def config(self) -> Any:
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(count for _, count in self._events)

    def compose(self, event: Any, count: int = 1) -> None:
        self._events.append((float(event.noise_multiplier), int(count)))

    def _rdp(self, a: float, extra: tuple[float, int] | None = None) -> float:
        events = self._events + ([extra] if extra else [])
        return sum(count * a / (2 * z**2) for z, count in events)

    def get_epsilon(self, delta: float, extra: tuple[float, int] | None = None) -> float:
        if not self._events and extra is None:
            return 0.0
        return min(
            max(0.0, self._rdp(a, extra) + math.log((a - 1) / a)
                - (math.log(delta) + math.log(a)) / (a - 1))
            for a in ORDERS
        )  # fmt: skip

    def get_delta(self, epsilon: float) -> float:
        if not self._events:
            return 0.0
        logs = [(a - 1) * (self._rdp(a) - epsilon + math.log1p(-1 / a)) - math.log(a)
                for a in ORDERS]  # fmt: skip
        return min(1.0, math.exp(min(logs)))

    def get_privacy_spent(self, delta: float | None = None) -> Any:
        from flwr.serverapp import PrivacySpent

        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(
            epsilon=self.get_epsilon(delta),
            delta=delta,
            num_releases=self.num_releases,
            accounting_method="rdp-gaussian-closed-form",
        )

    def would_exceed(self, event: Any, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        extra = (float(event.noise_multiplier), int(count))
        return self.get_epsilon(self._config.target_delta, extra) > limit

    def state_dict(self) -> dict[str, object]:
        return {"events": [list(e) for e in self._events]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        events = state.get("events", [])
        if not isinstance(events, list):
            raise TypeError("accountant state 'events' must be a list of (z, count) pairs")
        self._events = [(float(z), int(c)) for z, c in events]
