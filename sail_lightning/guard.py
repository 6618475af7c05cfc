"""The non-finite guard: a step whose loss or gradients are not finite never updates weights.

The check costs no host sync on steps that need none. Each step's verdict stays on the
device: ``finite = isfinite(loss) & isfinite(total gradient norm)``. A fused AdamW (what
``SAILModule.configure_optimizers`` builds where torch has one and the precision is not
Lightning's ``*-mixed``, whose plugin refuses to clip a fused optimizer's gradients) reads it
as ``found_inf`` and skips the update inside its kernel, as it does for a mixed-precision
scaler: no weight, moment or step count moves. Other optimizers (and FSDP2's sharded
parameters) get the verdict with one host sync, and a bad step's gradients are dropped (an
optimizer skips a parameter without a gradient). With more than one rank the verdicts are
reduced (max) across ranks, so every rank takes the same decision (FSDP1's gradient shards
and a rank's own loss differ between ranks). Under ``16-mixed`` the GradScaler owns
non-finite gradients (it skips the step and lowers its scale, as an fp16 run expects), so
the guard stands aside there.

Bad steps are counted on the device and read where the run syncs anyway (the logger's
steps, the end of each epoch); then the run stops with an error that names what is known:
the global step, the loss parts that were not finite (known when that step was a logging
step: ``trainer.log_every_n_steps=1`` names them always), the routes of its batch and the
option most likely responsible.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from sail_lightning.objectives.options import LossOptions

# Loss parts as SAILModule logs them (train/loss/...), and what each points to.
_PARTS = ("loss/dpo_term", "loss/label_term", "loss/response_term", "loss/bonus_term")
_HISTORY = 1024  # steps whose routes (host-side) are kept for the message


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips a step on the device when given ``found_inf`` (torch's
    fused Adam / AdamW / SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The total 2-norm of ``grads`` (None without any), on the device. torch's total norm
    handles FSDP2's sharded (DTensor) gradients (gathered by a collective, not a host sync);
    Lightning's grad_norm utility does not."""
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients of the optimizer's own parameters (FSDP1's flat parameters, not the
    module's views)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None]


class NonFiniteGuard:
    """Keeps non-finite steps out of the weights, and says which step went wrong and why."""

    def __init__(self) -> None:
        self.bad_steps: torch.Tensor | None = None  # count, on the device
        self.first_bad: torch.Tensor | None = None  # global step of the first bad one, or -1
        self._loss_finite: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping
        self._routes: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self._parts: dict[int, dict[str, float]] = {}
        self.skipped_synced = 0  # bad steps counted through a host sync (unfused optimizers)

    def record(self, step: int, loss: torch.Tensor, routes: Iterable[str],
               parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Called by the training step with its loss, the routes of its batch (host-side
        names) and, on logging steps, its loss parts (already synced there)."""
        finite = torch.isfinite(loss.detach())
        # Accumulated micro-batches: the step is bad if any of its losses was.
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._routes[step] = tuple(sorted(routes))
        while len(self._routes) > _HISTORY:
            self._routes.popitem(last=False)
        if parts:
            self._parts = {step: {k: float(parts[k]) for k in _PARTS if k in parts}}

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int, *,
                              world_size: int = 1) -> None:
        """Decides on the device whether this step may update the weights, and makes the
        optimizer skip it if not. The gradients checked are the optimizer's own parameters'
        (FSDP1's flat parameters, not the module's views), reduced across ranks already."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None  # the next step's micro-batches start afresh
        self.grad_norm = norm = grad_norm(optimizer_grads(optimizer))  # logged by the module
        if norm is not None:
            finite = finite.to(norm.device) & torch.isfinite(norm)
        bad = ~finite
        dist = torch.distributed
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            # One verdict for all ranks: a rank's loss, and FSDP1's gradient shards, are its
            # own; a rank skipping a step that another takes would split the weights. A
            # collective on the device, not a host sync.
            verdict = bad.long()
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
            bad = verdict.bool()
        if self.bad_steps is None:
            self.bad_steps = torch.zeros((), dtype=torch.long, device=bad.device)
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_steps = self.bad_steps + bad.long()
        if supports_found_inf(optimizer):
            optimizer.found_inf = bad.float()  # read by the fused kernel: no sync
        elif bool(bad):  # one host sync per step for optimizers that cannot skip on device
            self.skipped_synced += 1
            for p in params:
                p.grad = None

    def check(self, *, epoch: int, options: LossOptions, lr: float) -> None:
        """Raises if any step since the start was not finite (one host sync); the message
        names the likely option among the objective's ``options`` and the learning rate."""
        if self.bad_steps is None or int(self.bad_steps) == 0:
            return
        raise FloatingPointError(self.message(epoch=epoch, options=options, lr=lr))

    def message(self, *, epoch: int, options: LossOptions, lr: float) -> str:
        count, step = int(self.bad_steps), int(self.first_bad)
        routes = self._routes.get(step)
        parts = self._parts.get(step)
        bad_parts = [k.split("/")[1] for k, v in (parts or {}).items()
                     if not torch.isfinite(torch.tensor(v))]
        where = (f"train/loss or its gradients were not finite at global step {step} "
                 f"(epoch {epoch} or before; {count} such step(s), none updated the weights)")
        what = (f"non-finite loss parts: {', '.join(bad_parts) or 'none (the gradients)'}"
                if parts is not None else "loss parts unknown (they are computed on logging "
                "steps: trainer.log_every_n_steps=1 names them)")
        batch = f"routes in the batch: {', '.join(routes) if routes else 'unknown'}"
        return f"{where}; {what}; {batch}. {likely_cause(bad_parts, routes, options, lr)}"


def likely_cause(bad_parts: list[str], routes: tuple[str, ...] | None, options: LossOptions,
                 lr: float) -> str:
    """The option most likely responsible, from what is known."""
    online = routes is None or any(r in ("pp", "pr") for r in routes)
    released = options.response_term == "released_code"
    if "response_term" in bad_parts and released:
        return ("model.response_term=released_code divides by log pi(y), which nears 0 as "
                "responses shrink: use score_function, or lower model.coef_pp / coef_pr")
    if "response_term" in bad_parts:
        return (f"the response term (model.coef_pr={options.coef_pr}, "
                f"coef_pp={options.coef_pp}) is not finite: lower them or model.lr")
    if "bonus_term" in bad_parts:
        return f"the exploration bonus is not finite: lower model.bonus_alpha " \
               f"({options.bonus_alpha}) or model.lr"
    hint = (f"lower model.lr ({lr}) or raise model.beta ({options.beta}); "
            "check the data for empty responses")
    if not bad_parts and online and released:
        hint += ("; with model.response_term=released_code, its division by log pi(y) is a "
                 "common cause")
    return f"Likely: {hint}"


def fused_kwargs(params: list[torch.nn.Parameter], precision_plugin: object = None) -> dict:
    """``{"fused": True}`` where torch's fused AdamW takes these parameters (plain float
    tensors on CPU or CUDA; not FSDP2's DTensors) and Lightning can clip its gradients (its
    ``*-mixed`` plugin refuses to clip for an optimizer that unscales by itself), else
    ``{}``: the guard then costs a host sync a step."""
    if isinstance(precision_plugin, MixedPrecision) or getattr(precision_plugin, "scaler", None):
        return {}  # (a GradScaler sets found_inf itself, from its own check)
    ok = params and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                        and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                        for p in params)
    return {"fused": True} if ok else {}
