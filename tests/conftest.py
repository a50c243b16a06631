import os

# No test may reach a model hub: fail fast instead of retrying downloads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from a second thread, and a second thread stalls every small op when the
    machine's two cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
