"""FFA-LoRA: federated LoRA with the A factors frozen.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(https://arxiv.org/abs/2403.12313). Every client initialises A from the same seed
and keeps it frozen; only B is trained and averaged. With a common A, the average
of the products is the product of the averages, mean_k(B_k) A = mean_k(B_k A),
so the aggregation is exact (averaging both factors is not; see ``svd_lora``).
It also halves the upload.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from .fedavg_lora import FedAvgLoRA
from .reply_checks import is_lora_a


class FFALoRA(FedAvgLoRA):
    """FedAvg of the LoRA B factors only; A stays at its shared-seed initialisation.

    The server sends, and expects back, only the ``lora_B`` arrays, and tells the
    clients ``"lora-train"`` = ``"b"``. Constructor arguments: see ``FedAvgLoRA``.
    """

    lora_train = "b"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse to send A factors: under FFA-LoRA they are never exchanged."""
        if a_keys := [k for k in arrays if is_lora_a(k)]:
            raise ValueError(
                f"FFA-LoRA exchanges only the lora_B arrays, but the arrays to send "
                f"contain {len(a_keys)} lora_A keys (e.g. '{a_keys[0]}'). Build the "
                "ArrayRecord from the lora_B keys of the adapter state dict."
            )
        return super().configure_train(server_round, arrays, config, grid)

    def _accepted_replies(self, replies: list[Message]) -> list[Message]:
        # The generic key check would drop these too; this names the real cause.
        kept = []
        for msg in replies:
            record = _array_record(msg)
            if record is not None and any(is_lora_a(k) for k in record):
                log(
                    WARNING,
                    "Dropping the reply of node %s: it contains lora_A arrays, so the "
                    "client trained A, which FFA-LoRA keeps frozen",
                    msg.metadata.src_node_id,
                )
            else:
                kept.append(msg)
        return super()._accepted_replies(kept)


def _array_record(msg: Message) -> ArrayRecord | None:
    """The single ArrayRecord of a reply, or None (the generic checks report why)."""
    if msg.has_error() or not msg.has_content():
        return None
    records = list(msg.content.array_records.values())
    return records[0] if len(records) == 1 else None
