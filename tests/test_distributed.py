"""
train.py under torchrun: two processes on the CPU (gloo), each on its share of the global batch,
give the per-step losses and the final adapter tensors of one process with the same global batch
and seed, to 1e-5. The batch of 7 rows splits 4 + 3, and boolq's completions are 3 or 4 tokens
long, so a mean of per-process mean losses would not be the global mean (THEORY-free plumbing:
PyTorch's DistributedDataParallel, loss normalised by the global count of target tokens).

Run:  python -m pytest tests/test_distributed.py -q
"""
import json

import pytest
import torch

from conftest import script_ok

JOINT = ["--mode", "joint", "--steps", "30", "--batch-size", "7", "--n-train", "200", "--log-every", "10",
         "--device", "cpu"]


def results_and_tensors(out):
    with open(out / "results.json") as f:
        results = json.load(f)
    return results, torch.load(out / "adapters.pt", weights_only=True)["tensors"]


@pytest.mark.slow
def test_two_processes_match_one_process_step_by_step(tiny_base, tmp_path):
    script_ok("train.py", "--init", tiny_base, *JOINT, "--out-dir", tmp_path / "one")
    proc = script_ok("torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--init", tiny_base, *JOINT,
                     "--out-dir", tmp_path / "two")
    one, one_tensors = results_and_tensors(tmp_path / "one")
    two, two_tensors = results_and_tensors(tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 30
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    tensor_diff = max((one_tensors[k] - two_tensors[k]).abs().max().item() for k in one_tensors)
    print(f"2 processes vs 1: max loss diff {loss_diff:.1e}, max adapter tensor diff {tensor_diff:.1e}")
    assert loss_diff < 1e-5 and tensor_diff < 1e-5
    assert one_tensors.keys() == two_tensors.keys()
    assert one["losses"][-1] < one["losses"][0]                 # it trained: the numbers are not all zero
    assert one["accuracy"] == two["accuracy"]
    # only rank 0 evaluates and prints: one header, one summary, one log line per logged step
    assert proc.stdout.count("joint on boolq") == 1 and proc.stdout.count("accuracy 0.0% ->") == 1
    assert proc.stdout.count("step    10 |") == 1


def test_a_batch_smaller_than_the_number_of_processes_is_a_one_line_error(tiny_base, monkeypatch):
    import train
    monkeypatch.setenv("WORLD_SIZE", "2")                       # as torchrun --nproc_per_node=2 sets it
    args = train.parse_args(["--init", str(tiny_base), *JOINT, "--batch-size", "1"])
    with pytest.raises(ValueError, match="under torchrun --batch-size ≥ the number of processes") as e:
        train.resolve_args(args)
    assert "\n" not in str(e.value)
    train.resolve_args(train.parse_args(["--init", str(tiny_base), *JOINT, "--batch-size", "2"]))


def press_ctrl_c_in_rank_1(rank, store_file, answers):
    """One of two gloo processes: only rank 1 sees Ctrl-C; both ask CtrlC.pressed()."""
    import torch.distributed as dist
    from machinery import runtime
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    ctrl_c = runtime.CtrlC(world=2)
    ctrl_c.seen = rank == 1
    answers[rank] = ctrl_c.pressed()
    dist.destroy_process_group()


def test_ctrl_c_in_one_process_stops_every_process_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        answers = manager.dict()
        mp.spawn(press_ctrl_c_in_rank_1, args=(str(tmp_path / "store"), answers), nprocs=2)
        assert dict(answers) == {0: True, 1: True}
