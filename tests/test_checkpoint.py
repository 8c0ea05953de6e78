"""ear.checkpoint: realistic training checkpoints load without running code from the file."""

from __future__ import annotations

import argparse
import builtins
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ear.checkpoint import load_checkpoint, load_state_dict_file, unwrap_state_dict

RUAMEL = ("ruamel.yaml.comments", "ruamel.yaml.scalarfloat", "ruamel.yaml.scalarint")


def _fake_ruamel_classes() -> dict[str, type]:
    """Tiny classes pickled under ruamel's names, as a ruamel round-trip config would be."""

    class CommentedSeq(list):
        __slots__ = ("_lst", "_yaml_comment")

    class CommentedMap(dict):
        pass

    class Format:
        def __init__(self) -> None:
            self._flow_style = None

    class LineCol:
        def __init__(self) -> None:
            self.line, self.col = 3, 7

    class ScalarFloat(float):
        def __new__(cls, value: float, width: int = 0) -> ScalarFloat:
            obj = super().__new__(cls, value)
            obj._width = width
            return obj

    class ScalarInt(int):
        def __new__(cls, value: int, width: int = 0) -> ScalarInt:
            obj = super().__new__(cls, value)
            obj._width = width
            return obj

    placed = {CommentedSeq: RUAMEL[0], CommentedMap: RUAMEL[0], Format: RUAMEL[0], LineCol: RUAMEL[0],
              ScalarFloat: RUAMEL[1], ScalarInt: RUAMEL[2]}
    for cls, module in placed.items():
        cls.__module__, cls.__qualname__ = module, cls.__name__
    return {cls.__name__: cls for cls in placed}


def _save_with_fake_ruamel(monkeypatch: pytest.MonkeyPatch, build, path: Path, **save_kwargs) -> None:
    """Register the fake ruamel modules only while pickling, so loading cannot import them."""
    classes = _fake_ruamel_classes()
    with monkeypatch.context() as patch:
        for name in ("ruamel", "ruamel.yaml", *RUAMEL):
            module = types.ModuleType(name)
            for cls in classes.values():
                if cls.__module__ == name:
                    setattr(module, cls.__name__, cls)
            patch.setitem(sys.modules, name, module)
        torch.save(build(classes), path, **save_kwargs)
    assert "ruamel.yaml.comments" not in sys.modules


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"encoder.w": torch.randn(4, 3), "encoder.b": torch.randn(4),
            "quantize.embedding.weight": torch.randn(8, 2).to(torch.bfloat16)}


def _training_checkpoint(classes: dict[str, type]) -> dict:
    sd = _weights()
    seq = classes["CommentedSeq"]([16])
    seq._yaml_comment, seq._lst = classes["Format"](), classes["LineCol"]()
    args = argparse.Namespace(lr=classes["ScalarFloat"](1e-4, 6), codebook_size=classes["ScalarInt"](8192, 4),
                              v_patch_nums=seq, vq_model="VQ-16",
                              extra=classes["CommentedMap"](ema=True))
    # AdamW.state_dict() layout, written by hand: a real optimizer step costs seconds of imports
    optimizer = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(v),
                               "exp_avg_sq": torch.zeros_like(v)} for i, v in enumerate(sd.values())},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.05,
                                   "amsgrad": False, "params": list(range(len(sd)))}]}
    return {"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "optimizer": optimizer,
            "steps": 10, "args": args, "schedule": classes["CommentedSeq"]([1, 2, 3])}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_training_checkpoint_loads_through_restricted_fallback(monkeypatch, tmp_path, zip_format):
    path = tmp_path / "XQGAN-8192.pt"
    _save_with_fake_ruamel(monkeypatch, _training_checkpoint, path,
                           _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)

    obj = load_checkpoint(path)
    assert obj["steps"] == 10
    assert obj["schedule"] == [1, 2, 3]  # the CommentedSeq stand-in took append/extend
    assert not isinstance(obj["args"], argparse.Namespace)  # inert stand-in, state ignored
    assert "ruamel.yaml.comments" not in sys.modules

    sd = load_state_dict_file(path)
    assert sd.keys() == _weights().keys()
    for key, value in _weights().items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value)
    assert torch.equal(load_state_dict_file(path, prefer=("ema",))["encoder.b"], _weights()["encoder.b"] + 1)


class _Payload:
    """Pickles as a call to ``func(*args)``: what a malicious checkpoint would contain."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [os.system, builtins.eval, builtins.exec], ids=lambda f: f.__name__)
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_in_a_pickle_is_refused(tmp_path, func, writer):
    marker = tmp_path / "executed"
    code = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save({"model": _weights(), "args": _Payload(func, code)}, path)
    else:  # a bare pickle (tensors pickled this way would hit torch's own full-unpickle helper)
        path.write_bytes(pickle.dumps({"steps": 1, "args": _Payload(func, code)}, protocol=2))
    with pytest.raises(ValueError, match=rf"evil\.pt.*refusing.*{func.__name__}"):
        load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_or_foreign_files_raise_one_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": _weights()}, good)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": _weights()}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "truncated.pt": good.read_bytes()[: good.stat().st_size // 2],
        "truncated_legacy.pth": legacy.read_bytes()[:-200],
        "notes.bin": b"these are not weights\n",
        "empty.pt": b"",
        "broken.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
        "weights.npz": b"PK",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_state_dict_file(tmp_path / name)
    with pytest.raises(ValueError, match=r"missing\.pt"):
        load_state_dict_file(tmp_path / "missing.pt")
    torch.save({"steps": 3, "args": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    with pytest.raises(ValueError, match=r"no_weights\.pt.*unknown checkpoint layout"):
        load_state_dict_file(tmp_path / "no_weights.pt")
    torch.save([torch.ones(1)], tmp_path / "a_list.pt")
    with pytest.raises(ValueError, match=r"a_list\.pt"):
        load_state_dict_file(tmp_path / "a_list.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_not_executed(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match="TorchScript"):
        load_checkpoint(path)


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(), path)
    sd = load_state_dict_file(path)
    assert all(torch.equal(sd[k], v) for k, v in _weights().items())


def test_unwrap_layouts():
    w = torch.zeros(2)
    sd, dropped = unwrap_state_dict({"model": {"module._orig_mod.a.w": w, "module.b": w}, "steps": 3})
    assert list(sd) == ["a.w", "b"] and dropped == ["steps"]
    # torch.compile on a submodule leaves _orig_mod in the middle of the key
    assert list(unwrap_state_dict({"enc._orig_mod.w": w})[0]) == ["enc.w"]
    # "module." is only a wrapper when every key has it
    assert set(unwrap_state_dict({"module.w": w, "head.w": w})[0]) == {"module.w", "head.w"}
    # preference order and nesting (EAR: "model"; EMA-only files; Lightning-style "state_dict")
    assert unwrap_state_dict({"ema": {"w": w}, "model": {"v": w}})[0].keys() == {"v"}
    sd, dropped = unwrap_state_dict({"state_dict": {"model": {"w": w}, "epoch": 1}, "hparams": {}})
    assert list(sd) == ["w"] and dropped == ["hparams", "state_dict.epoch"]
    sd, dropped = unwrap_state_dict({"w": w, "n_averaged": 3})
    assert list(sd) == ["w"] and dropped == ["n_averaged"]
    with pytest.raises(ValueError, match="no weights"):
        unwrap_state_dict({"optimizer": {"state": {}}, "steps": 1})
    with pytest.raises(ValueError, match="collide"):
        unwrap_state_dict({"a._orig_mod.w": w, "a.w": w})
