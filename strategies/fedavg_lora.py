"""FedIT: federated averaging of LoRA adapters.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
2023 (https://arxiv.org/abs/2305.05644). Clients train the LoRA factors A and B of
a frozen base model and send only those; the server averages A and B separately
with the FedAvg weights (number of training examples).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .reply_checks import arrayrecord_nbytes, valid_train_replies


class FedAvgLoRA(FedAvg):
    """FedAvg of the LoRA factors A and B (FedIT), with per-reply checks.

    Every reply is checked on its own (see ``reply_checks.valid_train_replies``)
    before Flower averages the rest, so one bad client cannot end the run. The
    train config gets ``"lora-train"`` (``"ab"``: train and send A and B), and the
    aggregated train metrics get the traffic of the round: ``bytes_up`` (mean array
    bytes per accepted reply), ``bytes_down`` (array bytes sent to each client),
    ``clients_accepted`` and ``clients_rejected``.

    Parameters
    ----------
    max_update_bytes : int | None (default: None)
        Drop replies whose arrays take more bytes than this.
    **kwargs
        Passed on to Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).
    """

    #: Which LoRA factors the clients train and send back ("ab" or "b").
    lora_train = "ab"
    #: Whether clients may use a LoRA rank other than the one of the arrays sent.
    rank_flexible = False
    #: Whether a reply may leave out whole LoRA modules it does not hold.
    modules_flexible = False

    def __init__(self, *, max_update_bytes: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_update_bytes = max_update_bytes
        # The replies are checked against what was sent in the same round.
        self._sent_arrays: ArrayRecord | None = None
        self._bytes_down = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent and tell the clients which factors to train."""
        self._sent_arrays = arrays
        self._bytes_down = arrayrecord_nbytes(arrays)
        # A copy, so that the caller's train config is not changed behind its back.
        config = ConfigRecord(dict(config))
        if config.get("lora-train", self.lora_train) != self.lora_train:
            log(
                WARNING,
                "%s overrides 'lora-train'=%r of the train config with %r",
                type(self).__name__,
                config["lora-train"],
                self.lora_train,
            )
        config["lora-train"] = self.lora_train
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop the invalid replies, aggregate the others, add traffic metrics."""
        if self._sent_arrays is None:
            raise RuntimeError(
                f"{type(self).__name__}.aggregate_train checks the replies against the "
                "arrays sent by configure_train; call configure_train first."
            )
        replies = list(replies)  # may be a one-shot iterator
        accepted = self._accepted_replies(replies)
        if not accepted:
            log(
                WARNING,
                "aggregate_train: none of the %d replies of round %d is valid; "
                "the global arrays stay as they were",
                len(replies),
                server_round,
            )
            return None, None

        arrays, metrics = self._aggregate_accepted(server_round, accepted)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["bytes_up"] = sum(
            arrayrecord_nbytes(next(iter(m.content.array_records.values())))
            for m in accepted
        ) / len(accepted)
        metrics["bytes_down"] = self._bytes_down
        metrics["clients_accepted"] = len(accepted)
        metrics["clients_rejected"] = len(replies) - len(accepted)
        # DP-SGD clients report their cumulative epsilon: the most and the mean of
        # them (Flower's weighted average would weight privacy by data size).
        eps = [float(m.content["metrics"]["dp_epsilon"]) for m in accepted
               if "dp_epsilon" in m.content["metrics"]]
        if eps:
            metrics["dp_epsilon_max"] = max(eps)
            metrics["dp_epsilon_mean"] = sum(eps) / len(eps)
        return arrays, metrics

    def _accepted_replies(self, replies: list[Message]) -> list[Message]:
        """Return the replies fit for aggregation (subclasses add their own checks)."""
        return valid_train_replies(
            replies,
            self._sent_arrays,
            rank_flexible=self.rank_flexible,
            max_bytes=self.max_update_bytes,
            weight_key=self.weighted_by_key,
            modules_flexible=self.modules_flexible,
        )

    def _aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the accepted replies: here Flower's FedAvg of every factor."""
        return super().aggregate_train(server_round, accepted)
