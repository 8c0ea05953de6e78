"""Dynamic activation of an EAR model's FFNs (ActVAR, arXiv 2511.12893), its dense weights untouched.

Each SwiGLU FFN is cut into equal experts, groups of hidden neurons (the rows of w1 and w3 and the
columns of w2 move together), found by balanced k-means of the normalised w1 rows, so that
neurons that respond alike share an expert. A small router per layer (2-layer MLP, as DMoE-VAR,
arXiv 2510.08629) predicts each expert's output norm from the FFN's input; "dynamic-k" runs every
expert whose predicted norm is at least (1 - tau) of the largest. A token gate per layer (one
linear, ActVAR's gated token selector) lets a token skip the FFN altogether when its predicted
update is small: the residual carries it through unchanged. With every expert on (tau >= 1, gates
open), the activated FFN is the dense one bit for bit: experts are a mask over the hidden neurons,
in their own order. Distillation may also tune the experts' weights (`tuned`: copies of the dense
FFN, stored beside the routers), so that the experts that run make up for those that do not; every
expert on still runs the dense weights.

This module is the reference path (conversion, the two distillation stages on the model's own
samples, token agreement and the active share); it computes the masked FFN densely, so it saves
FLOPs on paper, not time. `ear.routed` is the engine's path that runs only the chosen experts.
Routers and gates are stored beside the model (`activation.safetensors`); the model's own files,
and the released checkpoints, stay as they are.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ear.model import EAR, FeedForward
from ear.sampler import generate

ACTIVATION_FILE = "activation.safetensors"
GATE_OPEN = 4.0  # an untrained token gate's bias: every token runs its FFN


@dataclass(frozen=True)
class ActivationConfig:
    experts: int = 8  # equal groups of hidden neurons per FFN
    router_hidden: int = 64
    tau: float = 0.5  # dynamic-k: run experts predicted at >= (1 - tau) x the largest; >= 1: all
    # The share of the generation order drawn dense before routing starts (the decode engine's
    # steps; 0: every step routed). The first steps decide what is drawn, and a routing slip there
    # turns the picture into another one; they hold few tokens, so keeping them dense costs little.
    dense_lead: float = 0.0
    # Stage 2 also tuned the experts' own weights (copies of the dense FFN kept beside it, used
    # whenever routing runs; every expert on still runs the dense weights).
    tuned: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.experts, int) and self.experts >= 1 and self.router_hidden >= 1
                and self.tau >= 0):
            raise ValueError(f"experts and router_hidden must be positive integers and tau >= 0, got "
                             f"{self.experts}, {self.router_hidden} and {self.tau}")
        check_lead(self.dense_lead)


def check_lead(lead: object) -> float:
    """The dense lead: a share of the generation order in [0, 1)."""
    if isinstance(lead, bool) or not isinstance(lead, numbers.Real) or not 0 <= float(lead) < 1:
        raise ValueError(f"the dense lead is the share of the generation order drawn dense before "
                         f"routing starts, a number in [0, 1), got {lead!r}")
    return float(lead)


def lead_rows(model: EAR, lead: float) -> torch.Tensor:
    """(2n + 2,) bool over the model's teacher-forced sequence (class token, n content tokens, the
    class token again, n mask queries; generation order): the rows the decode engine runs dense
    at this dense lead. A step is routed once its queries start at or past ceil(lead x n); it
    also feeds the previous part's content, so a part's content rows follow the next part's
    queries."""
    sched = model.schedule
    n, start, steps = sched.num_tokens, math.ceil(check_lead(lead) * sched.num_tokens), sched.num_steps
    begins = torch.tensor(sched.boundaries)
    part = torch.cat([torch.full((begins[k + 1] - begins[k],), k) for k in range(steps)])
    queries = begins[part] < start
    content = begins[(part + 1).clamp(max=steps - 1)] < start
    assert queries.numel() == n
    first = torch.tensor([start > 0])  # the class token goes with step 0
    return torch.cat([first, content, first, queries])


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
    """A dense FFN run with only the routed experts' neurons of the tokens its gate lets through
    (a mask in the neurons' own order)."""

    def __init__(self, dense: FeedForward, groups: torch.Tensor, router: Router, gate: nn.Linear,
                 tau: float, tuned: FeedForward | None = None, lead_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.router, self.gate, self.tau, self.dense = router, gate, tau, dense
        self.weights = dense if tuned is None or tau >= 1 else tuned  # the weights the experts slice
        # (L,) bool over a teacher-forced sequence: rows the engine runs dense (`lead_rows`)
        self.lead_rows = lead_rows
        self.register_buffer("owner", _owners(groups), persistent=False)  # hidden neuron -> expert
        self.active_share: list[float] = []  # per call: the share of expert evaluations run
        # Distillation (stage 2): the hard choice forward, a sigmoid of the margin backward
        # (straight-through), its mean kept for the budget.
        self.softness: float | None = None
        self.soft_share: torch.Tensor | None = None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.weights.w1(x)) * self.weights.w3(x)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., experts), 1 for each expert that runs, 0 else: dynamic-k over the router's
        predicted norms, for the tokens the gate lets through (in distillation, with the
        straight-through gradient)."""
        norms = torch.expm1(self.router(x)).clamp(min=0)  # the router predicts log(1 + norm)
        if self.tau >= 1:
            return torch.ones_like(norms)
        top = norms.max(-1, keepdim=True).values
        margin = norms - (1 - self.tau) * top
        logit = self.gate(x)
        hard = (margin >= 0).to(x.dtype) * (logit >= 0).to(x.dtype)
        keep = self.lead_rows
        if self.softness is None:
            gates = hard
        else:
            soft = torch.sigmoid(margin / (self.softness * top + 1e-6)) * torch.sigmoid(logit)
            self.soft_share = soft.mean() if keep is None else soft[..., ~keep, :].mean()  # routed rows
            gates = hard + soft - soft.detach()
        return gates if keep is None else gates.masked_fill(keep[:, None], 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        self.active_share.append(float((gates.detach() > 0.5).float().mean()))
        mask = gates.gather(-1, self.owner.expand(*gates.shape[:-1], -1))
        out = self.weights.dropout(self.weights.w2(self.hidden(x) * mask))
        if self.lead_rows is not None and self.weights is not self.dense:  # tuned experts: the
            out = torch.where(self.lead_rows[:, None], self.dense(x), out)  # lead's rows dense
        return out


def _owners(groups: torch.Tensor) -> torch.Tensor:
    owner = torch.empty(groups.numel(), dtype=torch.long)
    for expert, neurons in enumerate(groups):
        owner[neurons] = expert
    return owner


class Activation(nn.Module):
    """An EAR model's experts, routers and token gates: `applied(model)` runs the model activated."""

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
        self.report: dict[str, float] = {}  # what `convert` measured (kept in the file)
        self.routers = nn.ModuleList(Router(model.config.dim, config.router_hidden, config.experts)
                                     for _ in ffns)
        self.gates = nn.ModuleList(nn.Linear(model.config.dim, 1) for _ in ffns)
        with torch.no_grad():
            for gate in self.gates:
                gate.weight.zero_()
                gate.bias.fill_(GATE_OPEN)
        # tuned experts: the dense FFNs' weights to start from (`with_tuned_experts`, `distill`)
        self.tuned = nn.ModuleList(copy.deepcopy(ffn) for ffn in ffns) if config.tuned else None

    def with_tuned_experts(self, model: EAR) -> Activation:
        """This activation with expert weights of its own (copies of the dense FFNs), to tune."""
        return self if self.tuned is not None else self.with_config(model, replace(self.config, tuned=True))

    def with_config(self, model: EAR, config: ActivationConfig) -> Activation:
        """A copy under another config, every part this one has (routers, gates, tuned experts)
        carried over; a part only the new config has starts as `__init__` makes it."""
        other = Activation(model, config, self.groups)
        for name in self._parts():
            getattr(other, name).load_state_dict(getattr(self, name).state_dict())
        other.report = dict(self.report)
        return other

    @contextlib.contextmanager
    def applied(self, model: EAR, tau: float | None = None,
                lead: float = 0.0) -> Iterator[list[ActivatedFFN]]:
        """The model with every FFN activated (at `tau`, default the config's); dense again after.
        With a dense `lead`, only for the model's teacher-forced forward (`lead_rows`)."""
        tau = self.config.tau if tau is None else tau
        rows = lead_rows(model, lead) if lead else None
        dense = [block.feed_forward for block in model.layers]
        tuned = self.tuned if self.tuned is not None else [None] * len(dense)
        parts = zip(dense, self.groups, self.routers, self.gates, tuned, strict=True)
        wrapped = [ActivatedFFN(ffn, groups, router, gate, tau, own, rows)
                   for ffn, groups, router, gate, own in parts]
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

    def _parts(self) -> tuple[str, ...]:
        return ("routers", "gates") if self.tuned is None else ("routers", "gates", "tuned")

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) as stored: the expert groups, routers, gates (and tuned experts), the
        config and the report."""
        tensors = {f"groups.{i}": g.contiguous() for i, g in enumerate(self.groups)}
        for name in self._parts():
            tensors.update({f"{name}.{k}": v.detach().contiguous()
                            for k, v in getattr(self, name).state_dict().items()})
        return tensors, {"config": json.dumps(asdict(self.config)), "report": json.dumps(self.report)}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ACTIVATION_FILE
        tensors, metadata = self.tensors()
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, folder: str | Path, model: EAR) -> Activation:
        """Strict: every key present, shapes checked (safetensors: no pickles)."""
        path = Path(folder) / ACTIVATION_FILE
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return cls.from_tensors(model, load_file(str(path)), metadata, path.name)

    @classmethod
    def from_tensors(cls, model: EAR, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     name: str = ACTIVATION_FILE) -> Activation:
        """The activation stored as `tensors` and `metadata` (`tensors()`), checked against `model`."""
        try:
            config = ActivationConfig(**json.loads(metadata["config"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{name} has no valid activation config: {err}") from None
        tensors = dict(tensors)
        try:
            groups = [tensors.pop(f"groups.{i}") for i in range(len(model.layers))]
            activation = cls(model, config, groups)
            for part_name in activation._parts():
                part = {k.removeprefix(f"{part_name}."): v for k, v in tensors.items()
                        if k.startswith(f"{part_name}.")}
                getattr(activation, part_name).load_state_dict(part)
            extra = [k for k in tensors if not k.startswith(tuple(f"{n}." for n in activation._parts()))]
            if extra:
                raise KeyError(f"unexpected keys {extra[:4]}")
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{name}'s experts and routers do not fit this model "
                             f"({str(err)[:200]})") from None
        activation.report = json.loads(metadata.get("report", "{}"))
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
                  steps: int = 200, lr: float = 3e-3, seed: int = 0, skip: float = 0.1) -> list[float]:
    """Stage 1: the routers regress the experts' (log) output norms by MSE, backbone frozen, on
    teacher-forced forwards of `tokens` (the model's own samples); each token gate learns (logistic)
    to close for the `skip` share of tokens whose FFN update is smallest, a start for stage 2.
    Returns each layer's last router loss."""
    inputs = ffn_inputs(model, tokens, class_ids)
    losses = []
    generator = torch.Generator().manual_seed(seed)
    for layer, x in enumerate(inputs):
        x = x.reshape(-1, x.shape[-1]).float()
        with torch.no_grad():
            target = torch.log1p(activation.expert_norms(layer, model, x))
        losses.append(_fit(activation.routers[layer], x, target, F.mse_loss, steps, lr, generator))
        if skip > 0:
            norms = _update_norms(model, layer, x)
            _train_gate(activation.gates[layer], x, norms, skip, steps, lr, generator)
    return losses


def _update_norms(model: EAR, layer: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.layers[layer].feed_forward(x).norm(dim=-1)


def _train_gate(gate: nn.Linear, x: torch.Tensor, norms: torch.Tensor, skip: float, steps: int, lr: float,
                generator: torch.Generator) -> None:
    """Logistic regression: open (1) for tokens whose update norm is above the `skip` quantile;
    then the bias is moved so that the gate shuts for that share of these tokens exactly (a
    rare label alone would leave it open for nearly all)."""
    target = (norms > torch.quantile(norms, skip)).float()[:, None]
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.fill_(float(torch.logit(target.mean().clamp(1e-3, 1 - 1e-3))))
    _fit(gate, x, target, F.binary_cross_entropy_with_logits, steps, lr, generator)
    with torch.no_grad():
        gate.bias -= torch.quantile(gate(x).flatten(), skip)


def _fit(module: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
         steps: int, lr: float, generator: torch.Generator) -> float:
    """`steps` AdamW steps of `loss_fn(module(x), target)` on random minibatches (1,024 rows);
    the last loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = torch.randint(0, x.shape[0], (min(1024, x.shape[0]),), generator=generator)
        loss = loss_fn(module(x[batch]), target[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.item())


def distill(activation: Activation, model: EAR, tokens: torch.Tensor, class_ids: torch.Tensor,
            budget: float, steps: int = 200, lr: float = 1e-3, weight: float = 1.0, softness: float = 0.1,
            batch: int = 16, seed: int = 0, expert_lr: float = 3e-4,
            lead: float = 0.0) -> dict[str, float]:
    """Stage 2: routers and token gates learn, by the dense model's logits (KL on every mask query)
    and a penalty on the share of expert evaluations run above `budget`, which experts a token can
    do without, and which tokens need no FFN at all; an activation with tuned experts
    (`with_tuned_experts`) also tunes their weights (at `expert_lr`), so that the experts that run
    make up for those that do not. With a dense `lead`, the rows the engine runs dense stay dense
    here too, and the budget counts the routed rows only. The backbone stays frozen. Returns the
    last step's KL and soft share."""
    with torch.no_grad():
        teacher = F.log_softmax(model(tokens, class_ids).float(), -1)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = [{"params": [*activation.routers.parameters(), *activation.gates.parameters()], "lr": lr}]
    if activation.tuned is not None:
        groups.append({"params": [*activation.tuned.parameters()], "lr": expert_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(seed)
    try:
        with activation.applied(model, lead=lead) as ffns:
            for ffn in ffns:
                ffn.softness = softness
            for _ in range(steps):
                rows = torch.randint(0, tokens.shape[0], (min(batch, tokens.shape[0]),), generator=generator)
                student = F.log_softmax(model(tokens[rows], class_ids[rows]).float(), -1)
                kl = F.kl_div(student, teacher[rows], log_target=True, reduction="none").sum(-1).mean()
                share = torch.stack([ffn.soft_share for ffn in ffns]).mean()
                loss = kl + weight * F.relu(share - budget)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {"kl": kl.item(), "soft_share": share.item()}


def convert(model: EAR, config: ActivationConfig, budget: float, samples: int = 64, router_steps: int = 300,
            distill_steps: int = 80, seed: int = 0,
            progress: Callable[[str], None] = lambda _stage: None) -> tuple[Activation, dict[str, float]]:
    """Any EAR model -> its activation, on data it draws itself (no data set): `samples` own
    samples for the two stages, as many others to measure the FFN share run and the
    teacher-forced top-1 agreement with the dense model, both at the config's dense lead (the
    rows the engine runs dense stay dense). `progress` hears each stage's name."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget is the share of experts to run, in (0, 1], got {budget!r}")
    progress("drawing the model's own samples")
    tokens, classes = own_samples(model, 2 * samples, seed)
    train, held = slice(0, samples), slice(samples, 2 * samples)
    activation = Activation(model, config)
    progress("stage 1: routers regress the experts' norms")
    train_routers(activation, model, tokens[train], classes[train], steps=router_steps, seed=seed)
    progress("stage 2: routers distilled from the dense logits")
    lead = config.dense_lead
    distill(activation, model, tokens[train], classes[train], budget, steps=distill_steps, seed=seed,
            lead=lead)
    progress("measuring")
    activation.report = held_out_report(activation, model, tokens[held], classes[held])
    return activation, activation.report


def own_samples(model: EAR, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (count, n), labels (count,)): samples the model draws itself at temperature 1, of
    random labels; `convert` distils on the first half and measures on the second."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, model.config.num_classes, (count,), generator=generator)
    tokens = torch.cat([generate(model, classes[i:i + 16].tolist(), seed=seed + i, temperature=1.0)
                        for i in range(0, count, 16)]).flatten(1)
    return tokens, classes


def reconfigured(activation: Activation, model: EAR, samples: int = 64, seed: int = 0,
                 **changes: float) -> Activation:
    """A copy of `activation` with its config's `tau` and/or `dense_lead` changed and its experts,
    routers and gates kept, measured again on the same held-out own samples `convert` measured on
    (`samples`, `seed` as given to it): moving an operating point needs no new distillation."""
    moved = activation.with_config(model, replace(activation.config, **changes))
    tokens, classes = own_samples(model, 2 * samples, seed)
    moved.report = held_out_report(moved, model, tokens[samples:], classes[samples:])
    return moved


def held_out_report(activation: Activation, model: EAR, tokens: torch.Tensor,
                    class_ids: torch.Tensor) -> dict[str, float]:
    """The FFN share run and the teacher-forced top-1 agreement with the dense model on `tokens`
    (samples the distillation did not see), at the activation's tau and dense lead."""
    with torch.no_grad():
        dense = model(tokens, class_ids).argmax(-1)
        with activation.applied(model, lead=activation.config.dense_lead) as ffns:
            activated = model(tokens, class_ids).argmax(-1)
    share = sum(s for ffn in ffns for s in ffn.active_share) / len(ffns)
    return {"ffn_share": share, "agreement": float((dense == activated).float().mean())}
