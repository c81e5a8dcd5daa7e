import pytest
import torch

from common.config import load_config

torch.set_num_threads(1)  # CI has 2 cores; keep tests from oversubscribing them


@pytest.fixture
def tiny_cfg():
    """A quick mtsc experiment: a few clients, a small synthetic dataset."""
    return load_config("configs/quickstart.yaml", [
        "num_clients=3", "rounds=2", "data.num_samples=240", "train.local_epochs=1",
        "train.batch_size=16",
    ])


@pytest.fixture
def flower_message_context(monkeypatch):
    """flwr 1.41 builds Messages only inside a running app; give tests a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
