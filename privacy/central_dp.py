"""Central DP on the server (`privacy.dp.mode: central`): Flower's own strategy
wrappers around our averaging strategies.

- `clipping: server`: `DifferentialPrivacyServerSideFixedClipping` clips every
  client's update (reply minus the global arrays sent) to L2 norm `max_grad_norm`,
  lets the wrapped strategy average them and adds N(0, (sigma * C / n)^2) to the mean.
- `clipping: client`: `DifferentialPrivacyClientSideFixedClipping` sends the norm with
  the train message; the client clips its own update (Flower's `fixedclipping_mod`,
  on the train handler only: `clip_if_asked`) and the server adds the same noise.

The round-level epsilon is client-level DP over the rounds released so far, one
Gaussian mechanism of noise multiplier sigma per round, no sampling amplification
(every client takes part in every round), composed by Opacus' RDP accountant
(`privacy.dp.epsilon_of`). Flower's own RDP accountant does not apply here: in flwr
1.41 its accounted mode accepts only strategies whose `aggregate_train` is FedAvg's
own, and ours add the per-reply checks. As that mode requires, every client weighs the
same (`UNIFORM_WEIGHT` = 1, by which the strategy averages): with weights by data size
one client could move the mean by more than C / n. A reply that the per-reply checks
drop leaves fewer than n updates in the mean, and the noise is still that for n.
Only strategies whose aggregate is a mean of the updates can be wrapped (see
CENTRAL_DP_REFUSED in common/config/checks.py).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import DPConfig, ExperimentConfig
from common.records import Panel
from privacy.dp import epsilon_of

UNIFORM_WEIGHT = "uniform-weight"
PANELS = (Panel("central epsilon (server)", ("dp_central_epsilon",)),)


def wrap(strategy, cfg: ExperimentConfig):
    """`strategy` inside Flower's DP wrapper for `cfg.privacy.dp`."""
    dp = cfg.privacy.dp
    wrapper = (DifferentialPrivacyServerSideFixedClipping if dp.clipping == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, dp.noise_multiplier, dp.max_grad_norm, cfg.num_clients)


def central_epsilon(dp: DPConfig, releases: int) -> float:
    """Epsilon at `privacy.dp.delta` after `releases` noised aggregates."""
    return epsilon_of([(dp.noise_multiplier, 1.0, releases)], dp.delta) if releases else 0.0


def clip_if_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` for train messages that carry a clipping norm (a
    client-side-clipping run); other messages pass untouched (the mod refuses them)."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
