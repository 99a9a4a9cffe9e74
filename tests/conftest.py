import os

import pytest
import torch

# Keep the two CPU cores for the two ranks of multi-process tests; single-process tests are tiny anyway.
torch.set_num_threads(1)
os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _quiet_lightning(caplog):
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    yield
