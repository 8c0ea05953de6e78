"""Dynamic activation of an EAR model's FFNs (ActVAR, arXiv 2511.12893), its dense weights untouched.

Each SwiGLU FFN is cut into equal experts, groups of hidden neurons (the rows of w1 and w3 and the
columns of w2 move together), found by balanced k-means of the normalised w1 rows, so that
neurons that respond alike share an expert. A small router per layer (2-layer MLP, as DMoE-VAR,
arXiv 2510.08629) predicts each expert's output norm from the FFN's input; "dynamic-k" runs every
expert whose predicted norm is at least (1 - tau) of the largest. With every expert on, the
activated FFN is the dense one bit for bit: experts are a mask over the hidden neurons, in their
own order.

This module is the reference path (conversion, stage-1 distillation of the routers on the
model's own samples, token agreement and the active share); it computes the masked FFN densely,
so it saves FLOPs on paper, not time: a decode path that runs only the chosen experts belongs in
the engine. The routers are stored beside the model (`activation.safetensors`); the model's own
files, and the released checkpoints, stay as they are.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ear.model import EAR, FeedForward

ACTIVATION_FILE = "activation.safetensors"


@dataclass(frozen=True)
class ActivationConfig:
    experts: int = 8  # equal groups of hidden neurons per FFN
    router_hidden: int = 64
    tau: float = 0.5  # dynamic-k: run experts predicted at >= (1 - tau) x the largest; >= 1: all

    def __post_init__(self) -> None:
        if not (isinstance(self.experts, int) and self.experts >= 1 and self.router_hidden >= 1
                and self.tau >= 0):
            raise ValueError(f"experts and router_hidden must be positive integers and tau >= 0, got "
                             f"{self.experts}, {self.router_hidden} and {self.tau}")


def balanced_groups(weight: torch.Tensor, experts: int, iterations: int = 8, seed: int = 0) -> torch.Tensor:
    """(experts, hidden // experts) neuron indices: balanced k-means (cosine) of `weight`'s rows,
    each cluster filled to exactly its share, nearest neurons first."""
    hidden = weight.shape[0]
    if hidden % experts:
        raise ValueError(f"{hidden} hidden neurons do not split into {experts} equal experts")
    size = hidden // experts
    rows = F.normalize(weight.detach().float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centres = rows[torch.randperm(hidden, generator=generator)[:experts]]
    for _ in range(iterations):
        groups = _assign(rows @ centres.T, size)
        centres = F.normalize(rows[groups].mean(1), dim=1)
    return _assign(rows @ centres.T, size)


def _assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy balanced assignment: the most similar (neuron, cluster) pairs first, each cluster
    closed once it holds `size` neurons."""
    hidden, experts = similarity.shape
    owner = torch.full((hidden,), -1, dtype=torch.long)
    filled = [0] * experts
    for flat in torch.argsort(similarity.flatten(), descending=True).tolist():
        neuron, cluster = divmod(flat, experts)
        if owner[neuron] < 0 and filled[cluster] < size:
            owner[neuron] = cluster
            filled[cluster] += 1
    return torch.stack([torch.nonzero(owner == e).flatten() for e in range(experts)])


class Router(nn.Module):
    """Predicts each expert's output norm from the FFN's input."""

    def __init__(self, dim: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ActivatedFFN(nn.Module):
    """A dense FFN run with only the routed experts' neurons (a mask in the neurons' own order)."""

    def __init__(self, dense: FeedForward, groups: torch.Tensor, router: Router, tau: float) -> None:
        super().__init__()
        self.dense, self.router, self.tau = dense, router, tau
        self.register_buffer("owner", _owners(groups), persistent=False)  # hidden neuron -> expert
        self.active_share: list[float] = []  # per call: the share of expert evaluations run

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.dense.w1(x)) * self.dense.w3(x)

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        """(..., experts) bool: dynamic-k over the router's predicted norms."""
        norms = torch.expm1(self.router(x)).clamp(min=0)  # the router predicts log(1 + norm)
        if self.tau >= 1:
            return torch.ones_like(norms, dtype=torch.bool)
        return norms >= (1 - self.tau) * norms.max(-1, keepdim=True).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self.chosen(x)
        self.active_share.append(float(chosen.float().mean()))
        mask = chosen.gather(-1, self.owner.expand(*chosen.shape[:-1], -1))
        return self.dense.dropout(self.dense.w2(self.hidden(x) * mask))


def _owners(groups: torch.Tensor) -> torch.Tensor:
    owner = torch.empty(groups.numel(), dtype=torch.long)
    for expert, neurons in enumerate(groups):
        owner[neurons] = expert
    return owner


class Activation(nn.Module):
    """An EAR model's experts and routers: `applied(model)` runs the model activated."""

    def __init__(self, model: EAR, config: ActivationConfig,
                 groups: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        ffns = [block.feed_forward for block in model.layers]
        if groups is None:
            groups = [balanced_groups(ffn.w1.weight, config.experts, seed=i) for i, ffn in enumerate(ffns)]
        for g in groups:
            if g.shape != (config.experts, ffns[0].w1.out_features // config.experts):
                raise ValueError(f"expert groups of shape {tuple(g.shape)} do not fit this model")
        self.groups = groups
        self.routers = nn.ModuleList(Router(model.config.dim, config.router_hidden, config.experts)
                                     for _ in ffns)

    @contextlib.contextmanager
    def applied(self, model: EAR, tau: float | None = None) -> Iterator[list[ActivatedFFN]]:
        """The model with every FFN activated (at `tau`, default the config's); dense again after."""
        tau = self.config.tau if tau is None else tau
        dense = [block.feed_forward for block in model.layers]
        wrapped = [ActivatedFFN(ffn, groups, router, tau)
                   for ffn, groups, router in zip(dense, self.groups, self.routers, strict=True)]
        try:
            for block, ffn in zip(model.layers, wrapped, strict=True):
                block.feed_forward = ffn
            yield wrapped
        finally:
            for block, ffn in zip(model.layers, dense, strict=True):
                block.feed_forward = ffn

    def expert_norms(self, layer: int, model: EAR, x: torch.Tensor) -> torch.Tensor:
        """(..., experts): each expert's true output norm for FFN inputs `x` (the routers' target)."""
        ffn = model.layers[layer].feed_forward
        hidden = F.silu(ffn.w1(x)) * ffn.w3(x)
        w2 = ffn.w2.weight
        return torch.stack([(hidden[..., g] @ w2[:, g].T).norm(dim=-1) for g in self.groups[layer]], -1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"groups.{i}": g.contiguous() for i, g in enumerate(self.groups)}
        routers = self.routers.state_dict()
        tensors.update({f"routers.{k}": v.detach().contiguous() for k, v in routers.items()})
        path = folder / ACTIVATION_FILE
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.config))})
        return path

    @classmethod
    def load(cls, folder: str | Path, model: EAR) -> Activation:
        """Strict: every key present, shapes checked (safetensors: no pickles)."""
        path = Path(folder) / ACTIVATION_FILE
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        try:
            config = ActivationConfig(**json.loads(metadata["config"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path.name} has no valid activation config: {err}") from None
        tensors = load_file(str(path))
        try:
            groups = [tensors.pop(f"groups.{i}") for i in range(len(model.layers))]
            activation = cls(model, config, groups)
            activation.routers.load_state_dict({k.removeprefix("routers."): v for k, v in tensors.items()})
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{path.name}'s experts and routers do not fit this model "
                             f"({str(err)[:200]})") from None
        return activation


def ffn_inputs(model: EAR, tokens: torch.Tensor, class_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's FFN inputs for a teacher-forced forward of `tokens` (the routers' data)."""
    seen: list[torch.Tensor] = []
    hooks = [block.feed_forward.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for block in model.layers]
    try:
        with torch.no_grad():
            model(tokens, class_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def train_routers(activation: Activation, model: EAR, tokens: torch.Tensor, class_ids: torch.Tensor,
                  steps: int = 200, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Stage 1: the routers regress the experts' (log) output norms by MSE, backbone frozen, on
    teacher-forced forwards of `tokens` (the model's own samples). Returns each layer's last loss."""
    inputs = ffn_inputs(model, tokens, class_ids)
    losses = []
    generator = torch.Generator().manual_seed(seed)
    for layer, x in enumerate(inputs):
        x = x.reshape(-1, x.shape[-1]).float()
        with torch.no_grad():
            target = torch.log1p(activation.expert_norms(layer, model, x))
        router = activation.routers[layer]
        optimizer = torch.optim.AdamW(router.parameters(), lr=lr)
        for _ in range(steps):
            batch = torch.randint(0, x.shape[0], (min(1024, x.shape[0]),), generator=generator)
            loss = F.mse_loss(router(x[batch]), target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    return losses
