import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CPUs are shared and the test models are tiny: one thread beats two threads fighting others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
