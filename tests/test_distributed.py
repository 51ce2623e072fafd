"""CUDA-only paths of training checked on the CPU with stand-ins that fail as the GPU would.

* Collectives: a process group whose CUDA backend is a registered stand-in which, like NCCL,
  has no CPU backend, so a CPU tensor sent to it fails with NCCL's own error
  ("No backend type associated with device type cpu").
* ``--continue`` on another number of GPUs: torch.cuda's generator calls replaced by ones
  that refuse a device index beyond the visible count, as CUDA does ("invalid device ordinal").
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from autoseg.errors import UsageError
from autoseg.training import distributed
from autoseg.training.checkpoints import rng_state, set_rng_state
from autoseg.training.loop import TrainingLoop, TrainingState
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
from autoseg.training.schedule import PolySchedule

STAND_IN = "cudaonlystandin"


def _gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


@pytest.fixture
def cuda_group_stand_in(tmp_path, monkeypatch):
    """A one-rank process group built from ``process_group_backend(cuda=True)`` with NCCL's device rule."""
    if not hasattr(dist.Backend, STAND_IN.upper()):
        dist.Backend.register_backend(STAND_IN, _gloo, devices=["cuda"])  # serves CUDA tensors only, as NCCL
    monkeypatch.setattr(distributed, "CUDA_BACKEND", STAND_IN)
    backend = distributed.process_group_backend(cuda=True)
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


class FixedPrediction(torch.nn.Module):
    """Logits whose argmax is a given label map, whatever the input."""

    def __init__(self, labels: torch.Tensor, classes: int):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float() * 10

    def forward(self, image):
        return self.logits + 0 * self.unused


def test_training_collectives_work_on_a_group_whose_cuda_backend_refuses_cpu_tensors(cuda_group_stand_in):
    # The stand-in reproduces the failure the review found, on its own...
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(2), group=dist.new_group(backend=STAND_IN))
    # ...and the group training creates carries every collective the loop and the fold use.
    generator = np.random.default_rng(0)
    target = torch.from_numpy(generator.integers(0, 3, (2, 4, 6, 6)))
    predicted = torch.from_numpy(generator.integers(0, 3, (2, 4, 6, 6)))
    batches = itertools.repeat((torch.zeros(2, 1, 4, 6, 6), target))
    network = FixedPrediction(predicted, 3)
    loop = TrainingLoop(network=network, model=network, loss=DeepSupervisionLoss(DiceCELoss()),
                        train_batches=batches, val_batches=batches,
                        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), schedule=PolySchedule(0.1, 0.9, 1, 1),
                        num_classes=3, val_iters=3, progress=False)
    _, dice = loop.validate()
    # Dice per class counted independently with numpy (the three batches are the same one).
    p, t = predicted.numpy(), target.numpy()
    expected = [2 * np.sum((p == k) & (t == k)) / (np.sum(p == k) + np.sum(t == k)) for k in (1, 2)]
    assert dice == pytest.approx(expected)
    assert distributed.gather({"rank": 0}) == [{"rank": 0}]
    distributed.barrier()


class RefusingCuda:
    """torch.cuda's generator calls for ``visible`` devices; an index beyond them fails as CUDA does."""

    def __init__(self, visible: int, initialized: bool = True):
        self.visible, self.restored, self.seeded, self.initialized = visible, {}, {}, initialized
        # torch.cuda.default_generators is an empty tuple until CUDA starts in the process
        self.default_generators = tuple(self._generator(i) for i in range(visible)) if initialized else ()

    def _check(self, index: int) -> None:
        if index >= self.visible:
            raise RuntimeError("CUDA error: invalid device ordinal")

    def set_rng_state(self, state, device=0):
        index = torch.device(device).index if not isinstance(device, int) else device
        self._check(index if index is not None else 0)
        self.restored[index] = state

    def _generator(self, index):
        seeded = self.seeded

        class Generator:
            def manual_seed(self, seed):
                seeded[index] = seed

        return Generator()

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)  # what set_rng_state_all calls
        monkeypatch.setattr(torch.cuda, "default_generators", self.default_generators, raising=False)


@pytest.mark.parametrize("saved", [0, 1])
def test_continue_on_the_cpu_of_a_gpu_machine_leaves_the_unstarted_cuda_generators_alone(saved, monkeypatch):
    # --device cpu: CUDA never starts, so its generators do not exist yet (indexing them raised IndexError)
    state = rng_state()
    state["cuda"] = [torch.full((16,), 7, dtype=torch.uint8)] * saved
    cuda = RefusingCuda(visible=1, initialized=False)
    cuda.install(monkeypatch)
    assert set_rng_state(state, reseed=100) is None
    assert cuda.seeded == {} and sorted(cuda.restored) == list(range(saved))


@pytest.mark.parametrize("saved, visible", [(4, 2), (1, 3), (2, 2)])
def test_continue_on_another_number_of_gpus_restores_what_matches_and_reseeds_the_rest(saved, visible, monkeypatch):
    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]
    cuda = RefusingCuda(visible)
    cuda.install(monkeypatch)
    note = set_rng_state(state, reseed=100)
    both = min(saved, visible)
    assert sorted(cuda.restored) == list(range(both))
    assert all(int(cuda.restored[i][0]) == i for i in range(both)), "device i gets the state saved for device i"
    assert cuda.seeded == {i: 100 + i for i in range(both, visible)}
    if saved == visible:
        assert note is None
    else:
        assert f"{saved} GPU(s), {visible} visible now: {both} restored" in note and "\n" not in note


def test_ranks_started_a_second_apart_run_the_same_epochs_under_a_time_budget(monkeypatch):
    """Each rank's budget clock starts with its own process. Were the epoch length shaped from each
    rank's clock, ranks would disagree on it and one would take a training step (a gradient
    all-reduce) while the other validates: NCCL pairs the wrong collectives and hangs. Two ranks are
    simulated one after the other on a fake clock, both training from t = 2 s, rank 1's process
    started 1 s after rank 0's; its collectives get rank 0's values, as ``all_gather_object`` would."""
    from types import SimpleNamespace

    from autoseg.training import callbacks

    sent_by_rank_0: list = []

    def simulate(rank: int, process_started_at: float) -> list[tuple[int, int]]:
        calls = iter(range(10**6))

        def gather(value):
            if rank == 0:
                sent_by_rank_0.append(value)
                return [value, None]
            return [sent_by_rank_0[next(calls)], value]

        monkeypatch.setattr(callbacks, "gather", gather)
        clock = SimpleNamespace(now=2.0)
        monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock.now)
        budget = callbacks.TimeBudget(40 / 60, start=process_started_at)
        schedule = PolySchedule(1e-2, 0.9, total_epochs=1000, iters_per_epoch=250)
        loop = SimpleNamespace(schedule=schedule, rank=rank, val_iters=50, state=TrainingState())
        epochs = []
        while loop.state.epoch < schedule.total_epochs:
            epoch, iteration = loop.state.epoch, 0
            while iteration < schedule.iterations_in(epoch):
                clock.now += 0.025
                budget.on_iteration_end(loop, iteration, 0.0, 0.025)
                iteration += 1
            clock.now += 0.1
            epochs.append((iteration, loop.val_iters))
            loop.state.history.append({"iterations": iteration})
            loop.state.epoch += 1
            budget.on_epoch_end(loop, {"epoch": epoch, "iterations": iteration, "validation_seconds": 0.1})
            clock.now += 0.3
        return epochs

    rank_0 = simulate(0, process_started_at=0.0)
    assert len(rank_0) > 10 and rank_0[0][0] < 250  # the budget shortened the epochs
    assert simulate(1, process_started_at=1.0) == rank_0


def test_a_cuda_device_turns_on_cudnn_autotuning_and_the_cpu_leaves_it(monkeypatch):
    from autoseg.commands.predict import select_device as predict_device

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert distributed.select_device("cpu") == torch.device("cpu") and not torch.backends.cudnn.benchmark
    for wrong in ("gpu", "cpu:1", "cuda:x"):
        with pytest.raises(UsageError, match=f"device '{wrong}': expected auto, cpu, cuda"):
            predict_device(wrong)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for select in (distributed.select_device, predict_device):
        torch.backends.cudnn.benchmark = False
        assert select("auto") == torch.device("cuda") and torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the Python API's cuda:N and torch.device
    assert predict_device("cuda:1") == torch.device("cuda", 1) == predict_device(torch.device("cuda", 1))
    with pytest.raises(UsageError, match="cuda:2: 2 CUDA device"):
        predict_device("cuda:2")


def test_under_torchrun_each_rank_takes_its_own_gpu_and_a_cpu_run_touches_none(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.select_device("cuda") == torch.device("cuda", 1) == distributed.select_device("cuda:1")
    with pytest.raises(UsageError, match="each process uses its own GPU"):  # both ranks would claim GPU 0
        distributed.select_device("cuda:0")
    # torchrun with --device cpu on a GPU machine: a gloo-only group, and no set_device (a CUDA context).
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    made, devices = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda backend: made.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: devices.append(index))
    distributed.init_distributed("cpu")
    distributed.init_distributed("auto")
    assert made == ["gloo", distributed.process_group_backend(cuda=True)] and devices == [1]
