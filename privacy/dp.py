"""Client-side DP-SGD with Opacus (`privacy.dp.mode: local`).

A workload's `train_local` builds its optimizer and data loader as always and hands
them to `ClientDP.make_private`, which wraps them with Opacus' PrivacyEngine: per-example
gradients clipped to `max_grad_norm`, Gaussian noise of `noise_multiplier *
max_grad_norm`, and Poisson sampling of each batch.

A client's epsilon is cumulative over every round it took part in. Opacus' RDP
accountant keeps a history of (noise multiplier, sample rate, steps); the node keeps
that history with its private state (`context.state` and its `state-dir`, see
fl_client/node.py) and hands it to the next round's accountant, so epsilon after R
rounds is the accountant's over all R rounds of steps, including after a resume.
(Flower's Opacus example builds a new engine every round and reports a per-round
epsilon, which is not the privacy a client has spent.) A client whose budget
`max_epsilon` the next round would exceed does not train (`BudgetExhausted`).
"""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from common.config import DPConfig
from common.records import Panel

# Opacus is imported where it is used: importing it costs about 1.6 s of CPU (it pulls in
# torch.distributed's tensor ops), which every client process and the server would pay
# on start-up in runs without DP (benchmarks/profile_round.py).

# The key of the accountant's history among a node's private arrays.
HISTORY_KEY = "__dp_accountant_history__"
PANELS = (Panel("client epsilon (cumulative)", ("dp_epsilon_max", "dp_epsilon_mean")),)


class BudgetExhausted(RuntimeError):
    """Another round would take the client past `privacy.dp.max_epsilon`."""


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of an RDP accountant that saw `history`."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


class ClientDP:
    """One client's DP-SGD for one round, continuing the accountant of its past rounds."""

    def __init__(self, dp: DPConfig, rounds: int, local_epochs: int,
                 history: np.ndarray | None = None):
        self.dp, self.rounds, self.local_epochs = dp, rounds, local_epochs
        self.past = [(float(s), float(q), int(n)) for s, q, n in
                     (history if history is not None else np.zeros((0, 3)))]
        self.engine = None  # opacus.PrivacyEngine, once make_private ran
        self.noise_multiplier: float | None = None

    def make_private(self, model: nn.Module, optimizer, loader: DataLoader):
        """Opacus' (model, optimizer, loader) for this round's local epochs."""
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier

        sample_rate = 1.0 / len(loader)
        steps = self.local_epochs * len(loader)
        sigma = self.dp.noise_multiplier
        if sigma is None:  # the noise that spends `epsilon` over `rounds` such rounds
            sigma = get_noise_multiplier(target_epsilon=self.dp.epsilon,
                                         target_delta=self.dp.delta, sample_rate=sample_rate,
                                         steps=self.rounds * steps, accountant="rdp")
        self.noise_multiplier = float(sigma)
        if self.dp.max_epsilon is not None:
            after = epsilon_of(self.past + [(sigma, sample_rate, steps)], self.dp.delta)
            if after > self.dp.max_epsilon:
                raise BudgetExhausted(
                    f"another round would bring epsilon from {self.epsilon():.3f} to "
                    f"{after:.3f}, past privacy.dp.max_epsilon={self.dp.max_epsilon}; "
                    "this client trains no more in this run")
        self.engine = PrivacyEngine(accountant="rdp")
        self.engine.accountant.history = list(self.past)
        return self.engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                        noise_multiplier=sigma,
                                        max_grad_norm=self.dp.max_grad_norm,
                                        poisson_sampling=True)

    def history(self) -> np.ndarray:
        """The accountant's history after this round (to keep on the node)."""
        rows = self.engine.accountant.history if self.engine is not None else self.past
        return np.asarray(rows, dtype=np.float64).reshape(-1, 3)

    def epsilon(self) -> float:
        return epsilon_of([tuple(h) for h in self.history()], self.dp.delta)
