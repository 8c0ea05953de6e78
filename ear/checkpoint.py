"""Safe weight loading shared by the whole project.

Released checkpoints are pickles written by training scripts, so besides tensors they carry
optimizer state, step counters and an ``args`` namespace whose values may be ruamel.yaml
objects. ``torch.load(weights_only=True)`` refuses those, and full unpickling would run
whatever code a downloaded file names. We try the weights-only loader first and otherwise use a
restricted unpickler that rebuilds tensors, turns the known harmless config classes into inert
stand-ins and refuses every other global. Every failure is one ``ValueError`` naming the file.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import logging
import pickle
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _load_safetensors

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
DEFAULT_PREFER = ("model", "ema", "module", "state_dict")


# --- inert stand-ins for config objects that training scripts pickle next to the weights ----------

class _Inert:
    """Takes the place of a pickled config object: its state is discarded, never interpreted."""

    def __setstate__(self, state: object) -> None:
        pass


class _InertList(_Inert, list):
    """Stand-in for list subclasses (ruamel CommentedSeq): pickle fills it with append/extend."""


class _InertDict(_Inert, dict):
    """Stand-in for dict subclasses (ruamel CommentedMap): pickle fills it with __setitem__."""


class _InertFloat(_Inert, float):
    """Stand-in for ruamel's float subclasses; keeps the value, drops the formatting state."""


class _InertInt(_Inert, int):
    """Stand-in for ruamel's int subclasses (ScalarInt, ScalarBoolean, HexInt, ...)."""


class _InertStr(_Inert, str):
    """Stand-in for ruamel's str subclasses (the ScalarString family)."""


_STAND_INS: dict[str, type] = {"argparse.Namespace": _Inert}
for _module, _names, _stand_in in (
    ("ruamel.yaml.comments", ("CommentedSeq", "CommentedKeySeq"), _InertList),
    ("ruamel.yaml.comments", ("CommentedMap", "CommentedOrderedMap", "CommentedKeyMap"), _InertDict),
    ("ruamel.yaml.comments", ("Format", "LineCol", "Comment", "Tag", "TaggedScalar"), _Inert),
    ("ruamel.yaml.anchor", ("Anchor",), _Inert),
    ("ruamel.yaml.tag", ("Tag",), _Inert),
    ("ruamel.yaml.tokens", ("CommentToken",), _Inert),
    ("ruamel.yaml.error", ("CommentMark", "StreamMark", "StringMark", "FileMark"), _Inert),
    ("ruamel.yaml.scalarfloat", ("ScalarFloat", "ExponentialFloat", "ExponentialCapsFloat"), _InertFloat),
    ("ruamel.yaml.scalarint",
     ("ScalarInt", "BinaryInt", "OctalInt", "HexInt", "HexCapsInt", "DecimalInt"), _InertInt),
    ("ruamel.yaml.scalarbool", ("ScalarBoolean",), _InertInt),
    ("ruamel.yaml.scalarstring",
     ("ScalarString", "PlainScalarString", "SingleQuotedScalarString", "DoubleQuotedScalarString",
      "LiteralScalarString", "FoldedScalarString"), _InertStr),
):
    _STAND_INS.update({f"{_module}.{name}": _stand_in for name in _names})


def _allowed_globals() -> dict[str, Any]:
    """What a tensor pickle legitimately references: torch's rebuild helpers, storage, dtype,
    size and device types, and a few plain containers. Nothing here runs caller-chosen code."""
    from torch import _utils as tu

    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "_codecs.encode": codecs.encode,  # how protocol 2 pickles bytes
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch._tensor.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
        "torch.UntypedStorage": torch.UntypedStorage,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_qtensor",
                 "_rebuild_meta_tensor_no_storage"):
        if hasattr(tu, name):
            allowed[f"torch._utils.{name}"] = getattr(tu, name)
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            allowed[str(value)] = value  # str(torch.float32) == "torch.float32"
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list."""


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only from the allow-list and the stand-in table, never by importing."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's default) writes Python 2 names such as __builtin__.set.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if qualified in _STAND_INS:
            return _STAND_INS[qualified]
        raise _RefusedGlobal(f"it references {qualified}, which is not allowed in a weights file "
                             "(nothing was executed)")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load wants a module-like object with Unpickler, load and __name__.
_RESTRICTED_PICKLE = types.ModuleType("ear_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def _is_torchscript(path: Path) -> bool:
    """torch.load hands TorchScript archives to torch.jit.load unless weights_only; never do that."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())
    except zipfile.BadZipFile:  # torch.load will report the damage
        return False


def load_checkpoint(path: str | Path) -> Any:
    """Load a ``.pt/.pth/.bin/.ckpt`` pickle or a ``.safetensors`` file onto the CPU without ever
    running code from it. Returns whatever object the file holds (often a dict of entries)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return _load_safetensors(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own (Rust) error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; expected one of "
                         f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
    # Memory-map zip checkpoints: training files carry optimizer/EMA copies we are about to drop.
    mmap = zipfile.is_zipfile(path)
    if mmap and _is_torchscript(path):
        raise ValueError(f"{path}: is a TorchScript archive, not a checkpoint of weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        first_error = exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                         pickle_module=_RESTRICTED_PICKLE)
    except _RefusedGlobal as exc:
        raise ValueError(f"{path}: refusing to load: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                         f"{exc}") from exc
    reason = next((line.strip() for line in str(first_error).splitlines() if "Unsupported global" in line),
                  type(first_error).__name__)
    log.info("%s: loaded with the restricted unpickler (weights-only load refused it: %s)",
             path.name, reason)
    return obj


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers torch.compile (``_orig_mod`` components, anywhere) and
    DistributedDataParallel (a ``module.`` prefix shared by every key) add to names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        out[".".join(parts)] = value
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    if len(out) != len(sd):
        raise ValueError("two keys collide once the module./_orig_mod. wrappers are removed")
    return out


def unwrap_state_dict(obj: Any, prefer: Sequence[str] = DEFAULT_PREFER
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the weights in the layouts official scripts save and return ``(state_dict, dropped)``.

    ``obj`` is either a flat ``{name: tensor}`` mapping or a dict holding one under the first
    of ``prefer`` that is present (EAR and XQGAN save ``{"model": ..., "optimizer": ..., ...}``),
    possibly nested. ``dropped`` names every entry left out: sibling top-level entries such as
    ``optimizer``/``args``/``ema``, and non-tensor values inside the state dict.
    """
    dropped: list[str] = []
    path = ""
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in prefer if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if not tensors:
                raise ValueError(f"no weights found{' under ' + path if path else ''}: entries are "
                                 f"{sorted(map(str, obj))[:12]}, none of {list(prefer)} holds a "
                                 "state dict")
            dropped += [f"{path}{k}" for k in obj if k not in tensors]
            obj = tensors
            break
        dropped += [f"{path}{k}" for k in obj if k != key]
        path += f"{key}."
        obj = obj[key]
    else:
        raise ValueError(f"expected a dict of tensors, found {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise ValueError("state dict keys must be strings")
    return _strip_wrappers(obj), dropped


def load_state_dict_file(path: str | Path, prefer: Sequence[str] = DEFAULT_PREFER
                         ) -> dict[str, torch.Tensor]:
    """Load a weights file (any supported layout) and return the flat CPU state dict."""
    obj = load_checkpoint(path)
    try:
        sd, dropped = unwrap_state_dict(obj, prefer)
    except ValueError as exc:
        raise ValueError(f"{path}: unknown checkpoint layout: {exc}") from exc
    if dropped:
        log.info("%s: %d weights kept, dropped %s", Path(path).name, len(sd), ", ".join(dropped))
    return sd
