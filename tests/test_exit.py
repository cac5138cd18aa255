"""Every way a run ends ends the process, within seconds, with DataLoader workers alive (--workers 2).

Each case runs train.py's main in a subprocess (a driver script injects the error), with a timeout that
fails the test instead of hanging the suite: an error in the forward pass, in a worker's collate, in a
validation and in a save. The process-group SIGTERM case is test_run.py's
test_sigterm_to_process_group_with_workers_saves."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from test_train import REPO, flags, images_jsonl, load

DEADLINE = 30  # seconds from the error to the end of the process

# the driver: set up the injection, then run train.main with the given flags
DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
import torch, data, model, train
{inject}
try:
    train.main({argv!r})
finally:
    print(f"main returned or raised at {{time.time():.3f}}", flush=True)
"""

INJECT = {
    # an out-of-memory error, the most common crash of a GPU run, at the second step's forward
    "forward": """
        calls = [0]
        forward = model.SCLModel.forward
        def failing(self, batch):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("CUDA out of memory (injected)")
            return forward(self, batch)
        model.SCLModel.forward = failing
    """,
    # every collate in a worker process fails (the main process, --workers 0, would not)
    "collate": """
        collate = data.Collator.__call__
        def failing(self, samples):
            if torch.utils.data.get_worker_info() is not None and samples[0]["index"] >= 0:
                raise ValueError("collate failed (injected)")
            return collate(self, samples)
        data.Collator.__call__ = failing
    """,
    # the second validation (the first is before training) fails
    "validation": """
        calls = [0]
        evaluate = train.evaluate_retrieval
        def failing(*a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("validation failed (injected)")
            return evaluate(*a, **kw)
        train.evaluate_retrieval = failing
    """,
    # the second save fails with an error that is not a full disk
    "save": """
        calls = [0]
        save = torch.save
        def failing(*a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                raise TypeError("cannot pickle (injected)")
            return save(*a, **kw)
        torch.save = failing
    """,
}


def run_driver(tmp_path, case, argv):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=REPO, inject=textwrap.dedent(INJECT[case]), argv=argv))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise AssertionError(f"{case}: the process did not end (it hangs after the error)\n"
                             + proc.communicate()[0][-3000:])
    done = time.time()
    raised = [line for line in log.splitlines() if line.startswith("main returned or raised at ")]
    assert raised, log[-3000:]
    assert done - float(raised[0].split()[-1]) < DEADLINE, f"{case}: the process took too long to end after the error"
    return proc.returncode, log


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


# case, the error's message, the steps done when it stopped, the step of the checkpoint left (None: none yet)
@pytest.mark.parametrize("case,message,stopped_at,saved", [
    ("forward", "CUDA out of memory (injected)", 1, 1),
    ("collate", "collate failed (injected)", 0, None),
    ("validation", "validation failed (injected)", 2, 1),  # step 2's validation comes before its save
    ("save", "cannot pickle (injected)", 2, 1),
])
def test_an_error_ends_the_process(demo, tmp_path, case, message, stopped_at, saved):
    data = images_jsonl(demo, tmp_path, n=16)
    out = str(tmp_path / "run")
    argv = flags(data=data, out=out, steps=6, workers=2, save_every=1, eval_every=2 if case == "validation" else 0,
                 val_data=data if case == "validation" else None)
    rc, log = run_driver(tmp_path, case, argv)
    assert rc != 0, log[-3000:]
    assert message in log, log[-3000:]
    assert f"stopped by an error at step {stopped_at}" in log, log[-3000:]
    if saved is None:
        assert not os.path.exists(os.path.join(out, "last.pt"))
    else:  # the checkpoint before the error is intact
        assert load(os.path.join(out, "last.pt"))["step"] == saved
    assert not [f for f in os.listdir(out) if ".tmp" in f]
