"""The CUDA-graph rules of docs/cuda-graphs.md that can be checked without a GPU: the decode
runner's steps create no host tensor and never sync (run on the meta device, where any CPU tensor
would be a host-to-device copy on CUDA), inputs that change between generations are updated in the
same tensors, tokens handed out stay valid when the slot is reused, a stream in flight keeps the
weights its steps were prepared with, and `.to()` rebuilds the prepared weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ear.draw import RowSettings, row_keys
from ear.engine import runner_for
from ear.refine import Refinement
from ear.sampler import generate, sample
from tests.helpers import noisy_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SYNCS = frozenset({"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select"})


class _HostWatch(TorchDispatchMode):
    """Every op that leaves a tensor on the CPU, and every op that needs the device's values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.on_host: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs.append(name)
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else [out]:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                self.on_host.append(name)
        return out


def _rows(batch: int, **kwargs) -> RowSettings:
    settings = {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, **kwargs}
    return RowSettings.build(batch, 64, keys=row_keys(3, None, batch), **settings)


def _decode(model, ids: list[int], rows: RowSettings):
    empty = torch.zeros(len(ids), 0, dtype=torch.long)
    return runner_for(model).decode(torch.tensor(ids), rows, prefix=empty)


@pytest.mark.parametrize("settings", [{}, {"top_k": 5, "top_p": 0.9}, {"greedy": True, "cfg_scale": 1.0}])
def test_a_step_creates_no_host_tensor_and_never_syncs(settings: dict) -> None:
    """What a captured step may not do: on the meta device every tensor it makes would be a CPU
    tensor only if the code built one on the host (a copy to the GPU inside the capture)."""
    model = noisy_model().to("meta")
    steps = _decode(model, [1, 2], _rows(2, **settings))
    next(steps)  # the first step (class token) runs eagerly, never as a graph
    watch = _HostWatch()
    with watch:
        for _ in range(4):
            _k, logits, _tokens = next(steps)
    steps.close()
    assert logits.device.type == "meta"
    assert watch.on_host == [] and watch.syncs == [], (watch.on_host, watch.syncs)


@pytest.mark.parametrize("settings", [{}, {"top_k": 5, "top_p": 0.9}])
def test_a_refined_step_in_its_static_form_creates_no_host_tensor_and_never_syncs(settings: dict) -> None:
    """What graphed refined steps run (`static_refinement`): the re-fed part fed for every row and
    the checked cells corrected by a select, never asking the device (known cells: on the CPU, in
    tests/test_refine.py, as a generation's start reads them on the host)."""
    model = noisy_model(correction=True, schedule="radar").to("meta")
    runner = runner_for(model)
    runner.static_refinement = True
    empty = torch.zeros(2, 0, dtype=torch.long)
    steps = runner.decode(torch.tensor([1, 2]), _rows(2, **settings), prefix=empty,
                          refinement=Refinement(0.05))
    next(steps)  # the first step (class token) runs eagerly, never as a graph
    watch = _HostWatch()
    with watch:
        fixed = [fixes for _k, _logits, _tokens, fixes in steps]
    assert sum(len(f) for f in fixed) == runner.model.schedule.num_steps  # every part checked
    assert watch.on_host == [] and watch.syncs == [], (watch.on_host, watch.syncs)


def test_inputs_that_change_are_written_into_the_same_tensors() -> None:
    """A graph replays on fixed addresses: a new generation's classes, settings, noise streams and
    modulation go into the slot's tensors in place."""
    model = noisy_model()
    runner = runner_for(model)
    runner.release()
    generate(model, [1, 2], seed=1, cfg_scale=1.5)
    (slot,) = [s for slots in runner._free.values() for s in slots]

    def addresses() -> list[int]:
        settings = [getattr(slot.settings, n).data_ptr() for n in RowSettings.TENSORS]
        return [slot.cond.data_ptr(), slot.streams.data_ptr(), slot.tokens.data_ptr(),
                *(m.data_ptr() for m in slot.mods), *settings]

    before, streams = addresses(), slot.streams.clone()
    generate(model, [3, 4], seed=2, cfg_scale=2.5, temperature=0.5)
    assert [s for slots in runner._free.values() for s in slots] == [slot]  # reused
    assert addresses() == before and not torch.equal(slot.streams, streams)


def test_tokens_handed_out_stay_valid_when_the_slot_is_reused() -> None:
    model = noisy_model()
    kept = [tokens for _, _, tokens in _decode(model, [1, 2], _rows(2))]
    again = [tokens.clone() for _, _, tokens in _decode(model, [1, 2], _rows(2))]
    for _ in _decode(model, [5, 6], _rows(2, cfg_scale=3.0)):  # the same slot, other tokens
        pass
    assert all(torch.equal(a, b) for a, b in zip(kept, again, strict=True))


def test_a_stream_in_flight_keeps_the_weights_it_started_with() -> None:
    """`.to()` replaces every parameter's storage; a stream already running (whose graphs, on
    CUDA, read the old prepared weights' addresses) keeps those alive and finishes with them."""
    model = noisy_model(seed=0)
    before = generate(model, [1, 2], greedy=True, cfg_scale=1.5)
    stream = sample(model, [1, 2], greedy=True, cfg_scale=1.5)
    next(stream), next(stream)
    model.to(torch.float64)
    after = generate(model, [1, 2], greedy=True, cfg_scale=1.5)  # rebuilt in float64
    *_, last = stream
    assert torch.equal(last.tokens, before)
    assert torch.equal(after, generate(model, [1, 2], greedy=True, cfg_scale=1.5, engine="reference"))


def test_to_rebuilds_prepared_weights_and_caches() -> None:
    model = noisy_model()
    runner = runner_for(model)
    generate(model, [1], greedy=True)
    old = runner.weights
    model.to(torch.float64)
    assert torch.equal(generate(model, [1, 2], greedy=True, cfg_scale=1.5),
                       generate(model, [1, 2], greedy=True, cfg_scale=1.5, engine="reference"))
    assert runner.weights is not old and runner.weights.embed.dtype == torch.float64
    assert all(s.caches[0].dtype == torch.float64 for slots in runner._free.values() for s in slots)
