"""The workload seam: what a workload offers, so that the engine (fl_client, fl_server),
the strategies and the drivers (reports/) never special-case a paper.

A workload is a module, `models/<name>/workload.py`, registered by name in
common/workloads.py; these Protocols say what that module must define. A new paper
implements `Workload` (and `SplitWorkload` if it has a U-shaped split), nothing more;
`tests/test_seam.py` checks every registered workload against them, signatures included.

"Private by construction": a client's outgoing message takes its tensors from
`shared_state` only. Whatever `shared_state` leaves out (task decoders, private
encoders, labels, optimiser state) stays on the client, which keeps it between rounds
(models/client_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the registry and the config checks import no torch
    import numpy as np
    import torch
    from torch import Tensor, nn
    from torch.utils.data import DataLoader, Dataset

    from common.config import ExperimentConfig
    from common.records import Panel

# Wraps (model, optimiser, loader) for DP-SGD (privacy.dp.ClientDP.make_private).
MakePrivate = Callable[..., Any]


@runtime_checkable
class Workload(Protocol):
    """What the server, the client and the strategies call."""

    # Client metrics the round loop copies into each round's row of metrics.json: those
    # of the train replies, those of the evaluate replies.
    TRAIN_METRICS: tuple[str, ...]
    EVAL_METRICS: tuple[str, ...]
    SUMMARY: dict[str, str]  # metric -> format of the line printed when a round ends
    PANELS: tuple[Panel, ...]  # the workload's plots in metrics.png

    def build(self, cfg: ExperimentConfig, device: torch.device | str = "cpu",
              lora_rank: int | None = None) -> nn.Module:
        """The client's whole model on `device`, seeded so that every party builds the
        same starting point; `lora_rank` overrides `lora.rank` (heterogeneous ranks)."""

    def shared_state(self, model: nn.Module, lora_train: str = "ab") -> dict[str, np.ndarray]:
        """The only tensors that may leave a client (LoRA adapters, student or codec
        weights); with `lora_train="b"` (FFA-LoRA) the frozen A factors stay too."""

    def load_shared_state(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
        """Load the server's shared state; an unknown key or a wrong shape is refused."""

    def load_data(self, cfg: ExperimentConfig, partition_id: int,
                  num_partitions: int) -> tuple[Dataset, Dataset]:
        """The client's local (train, test) split."""

    def train_local(self, model: nn.Module, data: Dataset, cfg: ExperimentConfig,
                    lora_train: str = "ab", seed: int = 0,
                    make_private: MakePrivate | None = None) -> dict[str, float]:
        """`train.local_epochs` on the client's data; metrics with "train_loss" and
        "num-examples". `make_private` wraps the training for DP-SGD; a workload that
        cannot train privately raises ValueError when it is given."""

    def evaluate(self, model: nn.Module, data: Dataset,
                 cfg: ExperimentConfig) -> dict[str, float]:
        """Metrics (EVAL_METRICS and "num-examples") on the client's test split."""

    def prepare(self, cfg: ExperimentConfig) -> None:
        """Run by the server before round 1, e.g. pre-train what the clients load."""


@runtime_checkable
class InitialSharedState(Protocol):
    """A workload whose round-0 global state is not its seeded build: the server reads
    it (e.g. a codec pre-trained in `prepare`) and the clients receive it in round 1."""

    def initial_shared_state(self, cfg: ExperimentConfig) -> dict[str, np.ndarray]: ...


@runtime_checkable
class PublicSplit(Protocol):
    """A workload whose server pre-trains on a public split of the source (common/data):
    the examples after the clients' that no client owns, and no audit may count as
    held out."""

    def public_samples(self, cfg: ExperimentConfig) -> int:
        """The size of the public split."""


@runtime_checkable
class ClassLogits(Protocol):
    """A workload with a classification head the membership audit can score."""

    def class_logits(self, model: nn.Module, data: Dataset, cfg: ExperimentConfig) -> Tensor:
        """The head's logits [N, classes] of every example of `data`, in order, at the
        evaluation's seeded channel."""


@runtime_checkable
class SplitWorkload(Workload, Protocol):
    """A workload with a U-shaped split: the client keeps the model's ends (inputs,
    labels, task decoders), the server trains the middle; forward and backward passes
    cross as Flower messages (fl_client/split_handlers.py, fl_server/split_loop.py)."""

    LABEL_ROW: int  # the row of the server's output the classification head reads
    # TaskScorer(cfg): .add(task_decoders, h, batch) per batch of server outputs h, then
    # .result(): the task metrics of a split evaluation, computed on the client.
    TaskScorer: type

    def set_trainable(self, model: nn.Module, lora_train: str) -> None:
        """Freeze what the strategy does not train (FFA-LoRA: the A factors)."""

    def client_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Everything the client trains in split mode."""

    def server_half(self, model: nn.Module) -> nn.Module:
        """The module the server holds and trains."""

    def server_forward(self, server: nn.Module, received: Tensor, counts: Tensor,
                       snr_db: Tensor) -> Tensor:
        """The server half on what arrived over the uplink."""

    def eval_batches(self, data: Dataset, cfg: ExperimentConfig) -> DataLoader:
        """The batches of a split evaluation, in order."""

    def autocast_dtype(self, amp: str, device: torch.device) -> torch.dtype | None:
        """The autocast dtype for `train.amp` on `device` (None: fp32)."""
