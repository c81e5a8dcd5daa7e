"""Shared fixtures, how the tests are shared out between pytest-xdist workers, and two
knobs to check that no test leans on one machine's numbers:

    FEDSEMCOM_TEST_THREADS=N   torch threads in the test process (default 1: CI has 2
                               cores, and the tests must not oversubscribe them)
    FEDSEMCOM_TEST_SEED=K      every experiment config a test loads from a file gets
                               `seed: K` unless the test overrides the seed itself
                               (default: the files' own, 0)

A test that asserts on a trained model's numbers must pass with any of them.

`make test` runs two workers (`-n 2 --dist loadgroup`): the tests of one file stay on
one worker, so a module fixture is trained once, and every test marked `engine` (it
starts real Flower or Ray processes) runs on one worker, one at a time, so that no two
of them race for ports or for the cores at once.
"""

import os

import pytest
import torch

from common.config import load_config, loading

torch.set_num_threads(int(os.environ.get("FEDSEMCOM_TEST_THREADS", "1")))

if "FEDSEMCOM_TEST_SEED" in os.environ:
    _config_from_dict = loading.config_from_dict

    def _with_test_seed(raw, overrides=None):
        overrides = dict(overrides or {})
        if "seed" not in overrides:
            overrides["seed"] = int(os.environ["FEDSEMCOM_TEST_SEED"])
        return _config_from_dict(raw, overrides)

    loading.config_from_dict = _with_test_seed  # load_config builds every config through it


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "engine" if item.get_closest_marker("engine") else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def one_torch_thread():
    """One torch thread in this process during the test, as on a node (a Ray actor of one
    CPU, a fast-path executor with OMP_NUM_THREADS=1): a float sum split over another
    number of threads differs in the last bits, which AdamW carries to about 2e-5 after
    a few steps, so an equivalence test compares like with like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory):
    """One folder per test run (per worker) for pre-trained files: tosc teachers, taco
    codecs, diffusion DDPMs. A test names the file after the settings it trains with,
    so the tests that share those settings train it once; the file's fingerprint
    refuses it to a test with other settings (models/pretrained.py)."""
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="session")
def user_folder(tmp_path_factory):
    """Overrides for a tiny image folder of 48 scenes with masks and texts
    (tests/user_data.py)."""
    from tests.user_data import folder_overrides, write_image_folder

    return folder_overrides(*write_image_folder(tmp_path_factory.mktemp("user-folder")))


@pytest.fixture(scope="session")
def user_parquet(tmp_path_factory):
    """Overrides for the same 48 scenes as a Hugging Face dataset saved as parquet."""
    from tests.user_data import parquet_overrides, write_parquet

    return parquet_overrides(write_parquet(tmp_path_factory.mktemp("user-hf") / "train.parquet"))


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
