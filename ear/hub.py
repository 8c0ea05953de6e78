"""Where models come from: the registry of names, Hugging Face Hub downloads, local folders/files.

Three kinds of source, all ending in an `EAR` plus a `Tokenizer` in float32 on the CPU:

* our own format ("ear-studio/1"): a folder (or a Hub repo) holding config.json, ear.safetensors
  and tokenizer.safetensors, e.g. the bundled `assets/ear-emoji`;
* the released EAR-adaLN-{B,L,XL} checkpoints: official `.pt` files plus the XQGAN-8192 tokenizer,
  fetched with `huggingface_hub.hf_hub_download` (its cache, HF_HOME, HF_HUB_OFFLINE) and read
  through `ear.checkpoint` (weights-only first, a restricted unpickler as fallback, never full
  unpickling);
* a local official `.pt` file, its size recognised from its shapes.

Repo id, file name and revision of every downloaded component can be overridden by keyword
(CLI flags) or environment variables, because Hub repos get renamed: the tokenizer's repo is
documented as `qiuk6/RobustTok` but also seen spelled `qiuk6/RobusTok`, so both are tried.
Every failure is a ValueError naming what was tried and how to point elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from torch import nn

from ear.checkpoint import load_state_dict_file
from ear.model import EAR, EARConfig
from ear.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FORMAT = "ear-studio/1"
DEFAULT_MODEL = "ear-emoji"
PHOTO_MODEL = "ear-photo"  # the bundled model Extend uses for uploads
RADAR_MODEL = "radar-emoji"  # the bundled RadAR model (rings + correction head) Compare shows
COMPONENTS = ("model", "tokenizer")
OVERRIDE_FIELDS = ("repo", "file", "revision")
OWN_FILES = {"config": "config.json", "model": "ear.safetensors", "tokenizer": "tokenizer.safetensors"}

# Official sampling settings. The FID runs use top-k 9000, i.e. no filtering over 8192 codes (0).
FID_CFG = {"B": 1.65, "L": 1.45, "XL": 1.475}


def official_presets(size: str) -> dict[str, dict[str, float]]:
    return {
        "visual": {"cfg_scale": 1.45, "temperature": 1.0, "top_k": 100, "top_p": 1.0},
        "visual-top-p": {"cfg_scale": 1.45, "temperature": 1.0, "top_k": 100, "top_p": 0.95},
        "fid": {"cfg_scale": FID_CFG[size], "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    }


@dataclass(frozen=True)
class HubFile:
    """One file on the Hub; `alternates` are other spellings of the repo tried after `repo_id`."""

    repo_id: str
    filename: str
    revision: str | None = None
    alternates: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename} (revision {self.revision or 'main'})"

    def candidates(self) -> list[HubFile]:
        return [self] + [replace(self, repo_id=r, alternates=()) for r in self.alternates]


def _xqgan_config() -> Any:
    from ear.tokenizer.xqgan import XQGANConfig

    return XQGANConfig()


@dataclass(frozen=True)
class ModelEntry:
    """A registry name: either a bundled folder under assets/, or official files on the Hub."""

    name: str
    description: str
    bundled: str | None = None
    model: HubFile | None = None
    tokenizer: HubFile | None = None
    ear_config: Callable[[], EARConfig] | None = None
    tokenizer_config: Callable[[], Any] = _xqgan_config
    presets: dict[str, dict[str, float]] = field(default_factory=dict)
    default_preset: str = "visual"
    licence: str = ""
    attribution: str = ""


XQGAN_FILE = HubFile("qiuk6/RobustTok", "XQGAN-8192.pt", alternates=("qiuk6/RobusTok",))
_OFFICIAL_NOTE = ("EAR (arXiv 2511.15499), github.com/RuiqingYoung/EAR; tokenizer XQGAN-8192 from "
                  "ImageFolder/RobustTok (github.com/lxa9867/ImageFolder)")


def _official(size: str, params: str) -> ModelEntry:
    return ModelEntry(
        name=f"EAR-adaLN-{size}",
        description=f"released ImageNet 256x256 model, {params} parameters, 1000 classes",
        model=HubFile("FoodBamboo/EAR", f"EAR-adaLN-{size}.pt"),
        tokenizer=XQGAN_FILE,
        ear_config=partial(EARConfig.official, size),
        presets=official_presets(size),
        licence="MIT (official EAR code and weights)",
        attribution=_OFFICIAL_NOTE,
    )


REGISTRY: dict[str, ModelEntry] = {
    DEFAULT_MODEL: ModelEntry(DEFAULT_MODEL, "small model trained for this demo, bundled, runs on CPU",
                              bundled="ear-emoji"),
    PHOTO_MODEL: ModelEntry(PHOTO_MODEL, "small model of photographs and wallpapers trained for this demo "
                            "(scene kinds; extends your pictures), bundled, runs on CPU",
                            bundled="ear-photo"),
    RADAR_MODEL: ModelEntry(RADAR_MODEL, "RadAR variant of the emoji model: one square ring per step "
                            "(9 steps) and nested refinement of what was just drawn, bundled, runs on CPU",
                            bundled="radar-emoji"),
    **{e.name: e for e in (_official("B", "140M"), _official("L", "477M"), _official("XL", "1.1B"))},
}


@dataclass
class LoadedModel:
    """What `load` hands to the pipeline: float32 CPU modules plus everything shown to users."""

    name: str
    source: str
    model: EAR
    tokenizer: Tokenizer
    class_names: list[str]
    presets: dict[str, dict[str, float]]
    default_preset: str
    licence: str = ""
    attribution: str = ""
    hub_files: list[HubFile] = field(default_factory=list)
    # The class the page opens on, and old or familiar names that still find a class ("heart").
    default_class: str = ""
    class_aliases: dict[str, str] = field(default_factory=dict)
    # Image sets the model draws each class in (one class embedding per class and style, or one per
    # class shared by every style plus a style embedding: EARConfig.num_styles), e.g.
    # ["Twemoji", "Noto"]; empty for a model with one embedding per class.
    styles: list[str] = field(default_factory=list)
    # Class embeddings per (class, style), one per picture (ear.train.data.drawing_dataset): a seed
    # picks one; 1 for every other model.
    drawings: int = 1


# ---- overrides -----------------------------------------------------------------------------------

def override_env_name(component: str, what: str) -> str:
    return f"EAR_{component.upper()}_{what.upper()}"


def override_flag(component: str, what: str) -> str:
    return f"--{component}-{what}"


def _hint(component: str) -> str:
    flags = "/".join(override_flag(component, w) for w in OVERRIDE_FIELDS)
    envs = "/".join(override_env_name(component, w) for w in OVERRIDE_FIELDS)
    local = override_flag(component, "file")
    return f"set {flags} (or {envs}) to another repo, file or revision, or {local} to a local file"


def overrides_from(kwargs: dict[str, Any]) -> dict[str, str]:
    """Keyword overrides (model_repo=..., tokenizer_file=...) merged over EAR_* environment
    variables; unknown keywords are a ValueError naming the allowed ones."""
    allowed = [f"{c}_{w}" for c in COMPONENTS for w in OVERRIDE_FIELDS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown Hub override(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    out = {}
    for key in allowed:
        component, what = key.split("_")
        value = kwargs.get(key) or os.environ.get(override_env_name(component, what))
        if value:
            out[key] = str(value)
    return out


def apply_overrides(default: HubFile, component: str, overrides: dict[str, str]) -> HubFile | Path:
    """The default file with repo/file/revision replaced; a `file` that exists locally wins."""
    file = overrides.get(f"{component}_file")
    if file and Path(file).expanduser().is_file():
        return Path(file).expanduser()
    repo = overrides.get(f"{component}_repo")
    return HubFile(repo or default.repo_id, file or default.filename,
                   overrides.get(f"{component}_revision", default.revision),
                   () if repo else default.alternates)


# ---- downloads -------------------------------------------------------------------------------------

def fetch(ref: HubFile | Path, model_name: str, component: str, progress: type | None = None) -> Path:
    """A local path for `ref`, downloading into the Hub cache if needed (any alternate repo
    spelling is tried next); `progress` is a tqdm class for the download's progress (the Hub's
    own bars when None). ValueError says what was tried and how to override it."""
    if isinstance(ref, Path):
        return ref
    tried, failures, offline = [], [], True
    unreachable = not constants.is_offline_mode() and not _hub_resolvable()
    for candidate in ref.candidates():
        tried.append(str(candidate))
        if unreachable:  # asking the Hub again would only wait for another timeout: cache only
            found = cached_path(candidate)
            if found is not None:
                return found
            failures.append("not in the local cache")
            continue
        try:
            return Path(hf_hub_download(candidate.repo_id, candidate.filename, revision=candidate.revision,
                                        tqdm_class=progress))
        except LocalEntryNotFoundError:
            unreachable = True
            failures.append("not in the local cache and the Hub is unreachable")
        except (OSError, HFValidationError) as err:  # HTTP errors are OSErrors too
            offline = False
            failures.append(_first_line(err))
    if offline:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else "the Hugging Face Hub cannot be reached")
        raise ValueError(f"{model_name} is not downloaded yet ({component} {' or '.join(tried)}) and {why}: "
                         f"run `python -m ear download {model_name}` with internet access, or "
                         f"{_hint(component)}.")
    details = "; ".join(f"{t}: {f}" for t, f in zip(tried, failures, strict=True))
    raise ValueError(f"Could not download the {component} of {model_name} ({details}); {_hint(component)}.")


def hub_online() -> bool:
    """Whether downloads can be attempted: not HF_HUB_OFFLINE and the Hub's host resolves."""
    return not constants.is_offline_mode() and _hub_resolvable()


def _hub_resolvable() -> bool:
    """Whether the Hub's host name resolves. Without this check an offline machine would wait
    ~25 s per file while huggingface_hub retries, only to be told what the cache already knew."""
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "", 443)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return False
    return True


def cached_path(ref: HubFile) -> Path | None:
    """The cached copy of `ref` (or of an alternate spelling), without touching the network."""
    for candidate in ref.candidates():
        found = try_to_load_from_cache(candidate.repo_id, candidate.filename, revision=candidate.revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# ---- building modules -----------------------------------------------------------------------------

def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without paying for random initialisation (seconds for the large
    models), since its weights are overwritten at once. Modules whose buffers are computed in
    __init__ and not saved are built normally, as `to_empty` would leave those as garbage."""
    with torch.device("meta"):
        module = factory()
    saved = module.state_dict().keys()
    if any(name not in saved for name, _ in module.named_buffers()):
        return factory()
    return module.to_empty(device="cpu")


def read_weights(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Safely read a .safetensors/.pt file and return its float32 state dict."""
    try:
        state = load_state_dict_file(path)
    except ValueError as err:
        raise ValueError(f"Cannot read the {label}: {_first_line(err)}") from None
    except Exception as err:  # a damaged file can fail in many ways inside torch/safetensors
        raise ValueError(f"Cannot read the {label} '{path}': the file is damaged or not a "
                         f"checkpoint ({type(err).__name__}: {_first_line(err)}).") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_ear(path: Path, config: EARConfig | None) -> EAR:
    """`config=None` recognises a released checkpoint's size from its shapes."""
    state = read_weights(path, "EAR checkpoint")
    model = build_empty(partial(EAR, config or official_config_for(state, path)))
    try:
        model.load_weights(state)
    except ValueError as err:
        raise ValueError(f"The EAR checkpoint '{path}' does not fit the expected model: "
                         f"{_first_line(err)}") from None
    return model.eval()


def load_tokenizer(factory: Callable[[], Tokenizer], path: Path) -> Tokenizer:
    state = read_weights(path, "tokenizer checkpoint")
    tokenizer = build_empty(factory)
    try:
        tokenizer.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"The tokenizer checkpoint '{path}' does not fit the expected tokenizer: "
                         f"{detail}") from None
    return tokenizer.eval()


def _tokenizer_from_config(section: dict[str, Any]) -> Callable[[], Tokenizer]:
    """Factory for a config.json "tokenizer" section ({"type": ..., fields...})."""
    kind = section.get("type")
    if kind == "conv_vq":
        from ear.tokenizer.conv_vq import ConvVQ, ConvVQConfig

        return partial(ConvVQ, ConvVQConfig.from_dict(section))
    if kind == "xqgan":
        from ear.tokenizer.xqgan import XQGAN, XQGANConfig

        fields = XQGANConfig.__dataclass_fields__.keys()
        return partial(XQGAN, XQGANConfig(**{k: v for k, v in section.items() if k in fields}))
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'conv_vq' or 'xqgan')")


# ---- the three kinds of source --------------------------------------------------------------------

def load_own_format(files: dict[str, Path], name: str, source: str,
                    hub_files: list[HubFile] | None = None) -> LoadedModel:
    """config.json + ear.safetensors + tokenizer.safetensors (the layout in docs/api.md)."""
    try:
        config = json.loads(files["config"].read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, expected {FORMAT!r}")
        ear_config = EARConfig.from_dict(config["model"])
        tokenizer_factory = _tokenizer_from_config(config["tokenizer"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"The model config '{files['config']}' is not valid ({type(err).__name__}: "
                         f"{_first_line(err)}).") from None
    model = load_ear(files["model"], ear_config)
    tokenizer = load_tokenizer(tokenizer_factory, files["tokenizer"])
    _check_pair(model, tokenizer, files["config"])
    styles = config.get("styles") or []
    if not isinstance(styles, list) or not all(isinstance(s, str) and s for s in styles) \
            or len(set(styles)) != len(styles):
        raise ValueError(f"The model config '{files['config']}' has styles {styles!r}: expected a list of "
                         f"distinct names.")
    shared = ear_config.num_styles
    if shared and len(styles) != shared:
        raise ValueError(f"The model config '{files['config']}' has a shared embedding for {shared} style(s) "
                         f"(num_styles) but names {len(styles)} style(s): give one name per style.")
    drawings = config.get("drawings", 1)
    if isinstance(drawings, bool) or not isinstance(drawings, int) or drawings < 1 \
            or (drawings > 1 and (not styles or shared)):
        raise ValueError(f"The model config '{files['config']}' has drawings {drawings!r}: expected a whole "
                         f"number >= 1, above 1 only with styles that have their own class embeddings.")
    n, per_class = ear_config.num_labels, max(1, len(styles)) * drawings
    class_names = list(config.get("class_names") or [f"class {i}" for i in range(n // per_class)])
    if len(class_names) * per_class != n:
        raise ValueError(f"The model config '{files['config']}' names {len(class_names)} classes in "
                         f"{max(1, len(styles))} style(s) x {drawings} drawing(s) but the model has {n} "
                         f"class labels.")
    presets = config.get("presets") or {"default": {}}
    default_class = config.get("default_class", class_names[0])
    aliases = dict(config.get("class_aliases") or {})
    unknown = sorted({default_class, *aliases.values()} - set(class_names))
    if unknown:
        raise ValueError(f"The model config '{files['config']}' names classes it does not have as its "
                         f"default or alias targets: {', '.join(map(repr, unknown[:8]))}.")
    return LoadedModel(name=config.get("name", name), source=source, model=model, tokenizer=tokenizer,
                       class_names=class_names, presets=presets,
                       default_preset="default" if "default" in presets else next(iter(presets)),
                       licence=config.get("licence", ""), attribution=config.get("attribution", ""),
                       hub_files=hub_files or [], default_class=default_class, class_aliases=aliases,
                       styles=styles, drawings=drawings)


def load_official(entry: ModelEntry, model_ref: HubFile | Path, tokenizer_ref: HubFile | Path) -> LoadedModel:
    """Official `.pt` EAR checkpoint + XQGAN tokenizer checkpoint."""
    model_path = fetch(model_ref, entry.name, "model")
    model = load_ear(model_path, entry.ear_config() if entry.ear_config else None)  # fail fast
    tokenizer_path = fetch(tokenizer_ref, entry.name, "tokenizer")
    size = next((s for s in FID_CFG if EARConfig.official(s).dim == model.config.dim), None)
    presets = entry.presets or (official_presets(size) if size else {"default": {}})
    from ear.tokenizer.xqgan import XQGAN

    try:  # drops the training-only entries (semantic_model.*, ...) and loads the rest strictly
        tokenizer = XQGAN.from_checkpoint(tokenizer_path, entry.tokenizer_config())
    except ValueError as err:
        raise ValueError(f"Cannot read the tokenizer checkpoint: {_first_line(err)}") from None
    _check_pair(model, tokenizer, model_path)
    return LoadedModel(name=entry.name, source=f"{model_ref} + {tokenizer_ref}", model=model,
                       tokenizer=tokenizer, class_names=imagenet_class_names(model.config.num_classes),
                       presets=presets, default_preset=entry.default_preset if entry.default_preset in presets
                       else next(iter(presets)), licence=entry.licence,
                       attribution=entry.attribution,
                       hub_files=[r for r in (model_ref, tokenizer_ref) if isinstance(r, HubFile)])


def _check_pair(model: EAR, tokenizer: Tokenizer, where: Path) -> None:
    c = model.config
    if (c.vocab_size, c.grid_size) != (tokenizer.codebook_size, tokenizer.grid_size):
        raise ValueError(f"Model and tokenizer do not fit together ({where}): the model expects "
                         f"{c.vocab_size} codes on a {c.grid_size}x{c.grid_size} grid, the tokenizer has "
                         f"{tokenizer.codebook_size} on {tokenizer.grid_size}x{tokenizer.grid_size}.")


def official_config_for(state: dict[str, torch.Tensor], path: Path) -> EARConfig:
    """Recognise a released checkpoint's size from its embedding width."""
    width = state.get("tok_embeddings.weight", torch.empty(0, 0)).shape[-1]
    for size in FID_CFG:
        config = EARConfig.official(size)
        if config.dim == width:
            return config
    raise ValueError(f"'{path}' is not a released EAR-adaLN checkpoint (embedding width {width}; "
                     f"expected one of {[EARConfig.official(s).dim for s in FID_CFG]}).")


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, **hub_overrides: str | None) -> LoadedModel:
    """Load a registry name, a local folder in our format, a local official .pt file, or a Hub repo
    id in our format ("org/name"); see the module docstring for overrides."""
    overrides = overrides_from(hub_overrides)
    name = str(name_or_path)
    entry = REGISTRY.get(name)
    if entry is not None and entry.bundled:
        return _load_folder(ASSETS / entry.bundled, name)
    if entry is not None:
        assert entry.model is not None and entry.tokenizer is not None
        return load_official(entry, apply_overrides(entry.model, "model", overrides),
                             apply_overrides(entry.tokenizer, "tokenizer", overrides))
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, path.name)
    if path.is_file():
        entry = replace(REGISTRY["EAR-adaLN-B"], name=path.stem, ear_config=None, presets={})
        return load_official(entry, path, apply_overrides(XQGAN_FILE, "tokenizer", overrides))
    if is_repo_id(name):
        return _load_hub_repo(name, overrides)
    raise ValueError(f"Unknown model '{name}': use one of {', '.join(REGISTRY)}, a folder holding "
                     f"config.json, a released .pt checkpoint, or a Hub repo id in our format (org/name).")


def _load_folder(path: Path, name: str) -> LoadedModel:
    files = {key: path / filename for key, filename in OWN_FILES.items()}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise ValueError(f"The model folder '{path}' lacks {', '.join(missing)} (expected "
                         f"{', '.join(OWN_FILES.values())}).")
    return load_own_format(files, name, str(path))


def is_repo_id(name: str) -> bool:
    """Whether `name` looks like a Hub repo id ("org/name") and is not a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _own_repo_refs(repo_id: str, overrides: dict[str, str]) -> dict[str, HubFile]:
    """The three files of a Hub repo in our format (its revision set by --model-revision)."""
    revision = overrides.get("model_revision")
    return {key: HubFile(repo_id, filename, revision) for key, filename in OWN_FILES.items()}


def _load_hub_repo(repo_id: str, overrides: dict[str, str]) -> LoadedModel:
    refs = _own_repo_refs(repo_id, overrides)
    files = {key: fetch(ref, repo_id, "tokenizer" if key == "tokenizer" else "model")
             for key, ref in refs.items()}
    return load_own_format(files, repo_id, f"hf://{repo_id}", list(refs.values()))


def download(name: str, *, progress: type | None = None, **hub_overrides: str | None) -> list[Path]:
    """Fetch a Hub model's files into the cache without loading them (nothing for bundled or
    local models); returns the cached paths. `progress`: a tqdm class, as for `fetch`."""
    overrides = overrides_from(hub_overrides)
    entry = REGISTRY.get(name)
    if entry is not None and entry.bundled:
        return []
    if entry is not None:
        assert entry.model is not None and entry.tokenizer is not None
        refs = {"model": apply_overrides(entry.model, "model", overrides),
                "tokenizer": apply_overrides(entry.tokenizer, "tokenizer", overrides)}
    elif is_repo_id(name):
        refs = _own_repo_refs(name, overrides)
    else:
        raise ValueError(f"Nothing to download for '{name}': use one of {', '.join(REGISTRY)} or a Hub "
                         f"repo id (org/name).")
    return [fetch(ref, name, "tokenizer" if key == "tokenizer" else "model", progress)
            for key, ref in refs.items()]


# ---- listing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStatus:
    name: str
    description: str
    location: str
    status: str  # "bundled", "cached", "partly cached", "not downloaded", "missing"
    size_bytes: int


def list_models(**hub_overrides: str | None) -> list[ModelStatus]:
    """Every registry entry with what is available locally (no network access)."""
    overrides = overrides_from(hub_overrides)
    rows = []
    for entry in REGISTRY.values():
        if entry.bundled:
            folder = ASSETS / entry.bundled
            present = [folder / f for f in OWN_FILES.values() if (folder / f).is_file()]
            status = "bundled" if len(present) == len(OWN_FILES) else "missing"
            rows.append(ModelStatus(entry.name, entry.description, str(folder), status,
                                    sum(p.stat().st_size for p in present)))
            continue
        assert entry.model is not None and entry.tokenizer is not None
        refs = [apply_overrides(entry.model, "model", overrides),
                apply_overrides(entry.tokenizer, "tokenizer", overrides)]
        paths = [r if isinstance(r, Path) else cached_path(r) for r in refs]
        found = [p for p in paths if p is not None]
        status = {len(refs): "cached", 0: "not downloaded"}.get(len(found), "partly cached")
        rows.append(ModelStatus(entry.name, entry.description, " + ".join(map(str, refs)), status,
                                sum(p.stat().st_size for p in found)))
    return rows


@cache
def imagenet_class_names(num_classes: int = 1000) -> list[str]:
    """ImageNet-1k names ("tench, Tinca tinca", ...) for the released models, from
    assets/imagenet_classes.tsv; any other class count (or a missing file) gets numbered names."""
    try:
        rows = (ASSETS / "imagenet_classes.tsv").read_text(encoding="utf-8").splitlines()
        names = [row.split("\t", 1)[1].strip() for row in rows if row and not row.startswith("#")]
    except (OSError, IndexError):
        names = []
    if len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return names
