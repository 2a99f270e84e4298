"""The real bitsandbytes 8-bit AdamW (optimizer.use_bnb_optimizer) through the Trainer: its state is 8-bit,
the loss falls, and a resume continues bitwise. Skipped where bitsandbytes is not installed (it is in the
dev extras); its import never touches the network (neox.kernels.bnb)."""

import subprocess
import sys

import pytest
import torch

from neox.kernels.bnb import load_bitsandbytes
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

pytestmark = pytest.mark.skipif(load_bitsandbytes() is None, reason="bitsandbytes is not installed")
BNB = {"use_bnb_optimizer": True, "lr": 3e-3}
MODEL = {"hidden_size": 64}  # bitsandbytes keeps 32-bit state for tensors under 4096 values: some are larger


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=200)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def config(corpus, run, **checkpoint):
    return tiny_config(
        corpus,
        run,
        model=MODEL,
        train={"train_iters": 16},
        optimizer=BNB,
        eval={"eval_iters": 0},
        logging={"log_interval": 1},
        checkpoint={"save_interval": 8, **checkpoint},
    )


PROBE = """
import sys
calls = []
sys.addaudithook(lambda event, args: calls.append(event) if event.startswith("socket.") else None)
from neox.kernels.bnb import load_bitsandbytes
assert load_bitsandbytes() is not None
print("socket calls:", calls)
"""


def test_import_makes_no_network_attempt():
    # a fresh process: the import is what is watched (bitsandbytes 0.50 with `kernels` installed resolves
    # huggingface.co during a plain `import bitsandbytes` on CPUs with avx512_bf16)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert "socket calls: []" in out.stdout, out.stdout + out.stderr


def test_trains_with_8bit_state_and_resumes_bitwise(corpus, tmp_path):
    bnb = load_bitsandbytes()
    straight = Trainer(config(corpus, tmp_path / "a"), quiet=True)
    assert isinstance(straight.optimizer, bnb.optim.AdamW8bit)
    straight.fit()
    assert sum(straight.losses[-4:]) < sum(straight.losses[:4]) - 0.2, straight.losses
    states = [s for s in straight.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)

    first = Trainer(config(corpus, tmp_path / "b"), quiet=True)
    first.fit(stop_at=8)
    resumed = Trainer(config(corpus, tmp_path / "b", load=str(tmp_path / "b")), quiet=True)
    assert resumed.iteration == 8
    resumed.fit()
    assert first.losses + resumed.losses == straight.losses  # bitwise
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
