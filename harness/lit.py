"""LightningModule around the plain-torch :class:`Decoder` (dense or MoE): loss, optimiser, schedule, metrics."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch

from harness.errors import ConfigError
from harness.model import Decoder
from harness.moe import moe_modules, record_loads, tracks_load

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, WSD (warmup-stable-decay) or constant LR."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # WSD: last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # fused AdamW: "auto" on CUDA. Fused, a step's guards skip its update on the device (the optimizer's
    # found_inf) and are read on the host during the next step, so the GPU never waits for the host
    fused: bool | str = "auto"

    def validate(self) -> None:
        if self.fused not in ("auto", True, False):
            raise ConfigError(f"optim.fused={self.fused!r} must be auto, true or false")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be > 0")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps} / optim.min_lr_ratio={self.min_lr_ratio} out of range"
            )

    def decay_start(self, total: int) -> int:
        """WSD: the first step of the decay. Every step before it has the same LR for any ``total``, which is
        what lets runs of several budgets share one stable trunk (harness/trunk.py)."""
        return max(int(total * (1 - self.decay_fraction)), self.warmup_steps)

    def lr_factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "wsd":
            start = self.decay_start(total)
            if step < start:
                return 1.0
            frac = (step - start) / max(1, total - start)
            return 1.0 - (1.0 - self.min_lr_ratio) * min(frac, 1.0)
        frac = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


class LitLM(L.LightningModule):
    """Trains a Decoder; logs train/loss, val/loss, moe/*, lr, tokens and FLOPs seen, perf/*."""

    def __init__(
        self,
        model: Decoder,
        optim: OptimConfig,
        total_steps: int,
        train_flops_per_token: int,
        peak_flops: float | None = None,
        tokens_per_step: int | None = None,
        max_grad_norm: float | None = None,
        collapse_share: float = 1.0,
        collapse_steps: int = 100,
    ):
        super().__init__()
        # numerical guards: a non-finite loss, or a pre-clip gradient norm above max_grad_norm (or non-finite),
        # stops the run and its update never reaches the weights; one expert taking more than collapse_share of
        # the tokens for collapse_steps steps is a warning. They are read on the host together, once per
        # optimizer step (``_check_step``): before the update, or, with fused AdamW, one step later while the
        # GPU runs the next step, the bad update skipped on the device (``_guard_on_device``).
        self.max_grad_norm, self.collapse_share, self.collapse_steps = max_grad_norm, collapse_share, collapse_steps
        self._deferred: tuple[int, torch.Tensor, object] | None = None  # (step, guards on the host, ready event)
        self._loss_ok: torch.Tensor | None = None  # all losses of this optimizer step finite (on the device)
        self._collapsed_for: torch.Tensor | None = None  # consecutive collapsed micro-batches (on the device)
        self._collapse_warned = False
        self.model, self.optim, self.total_steps = model, optim, total_steps
        self.tokens_per_step = tokens_per_step  # global tokens per optimizer step (None: one micro-batch x world)
        # decided before any wrapping: FSDP (use_orig_params) flattens the parameters it shards
        self._no_decay = {n for n, p in model.named_parameters() if p.dim() < 2}
        self.flops_per_token, self.peak_flops = train_flops_per_token, peak_flops
        self._t_last: float | None = None
        # global_aux_loss / expert_bias: the micro-batch's loads, recorded after its backward (on_after_backward)
        self._moes = moe_modules(model) if tracks_load(model) else []
        self._pending_loads: list[torch.Tensor] = []
        self.last_loss: torch.Tensor | None = None  # the last micro-batch's LM loss, on the device

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x, y)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        finite = torch.isfinite(loss.detach())  # checked before the update, in _check_step (no sync here)
        self._loss_ok = finite if self._loss_ok is None else self._loss_ok & finite
        tokens = (self.global_step + 1) * (self.tokens_per_step or x.numel() * self.trainer.world_size)
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/tokens": _host(tokens),
                "flops/train_total": _host(tokens * self.flops_per_token),
            },
            prog_bar=False,
        )
        # the progress bar reads this when it redraws (harness.console): a value logged with prog_bar=True is
        # turned into a Python number by Lightning after every batch, a host sync a step, bar shown or not
        self.last_loss = out.loss.detach()
        if out.router:
            self._log_router(out.router)
            self._watch_collapse(out.router, x.numel())
            if self._moes:
                self._pending_loads = [r.tokens_per_expert for r in out.router]
        now = time.perf_counter()
        if self._t_last is not None:
            tps = x.numel() * self.trainer.world_size / (now - self._t_last)
            self.log("perf/tokens_per_s", _host(tps))
            if x.is_cuda:
                self.log("perf/max_mem_gib", _host(torch.cuda.max_memory_allocated(x.device) / 2**30))
            if self.peak_flops:
                self.log("perf/mfu", _host(tps * self.flops_per_token / (self.peak_flops * self.trainer.world_size)))
        self._t_last = now
        return loss

    def _log_router(self, router) -> None:
        aux = torch.stack([r.load_balance for r in router]).mean()
        metrics = {
            "moe/aux_loss": aux,
            "moe/z_loss": torch.stack([r.z_loss for r in router]).mean(),
            "moe/expert_load_cv": torch.stack([r.load_cv for r in router]).mean(),
            "moe/router_entropy": torch.stack([r.entropy for r in router]).mean(),
            "moe/max_expert_share": torch.stack(
                [r.tokens_per_expert.max() / r.tokens_per_expert.sum() for r in router]
            ).max(),
        }
        for layer, r in zip(self.model.moe_layers, router):
            metrics[f"moe/layer{layer}_load_cv"] = r.load_cv
        dropped = [r.dropped_share for r in router if r.dropped_share is not None]
        if dropped:  # moe.capacity_factor set: the share of routed copies over capacity, dropped
            metrics["moe/dropped_share"] = torch.stack(dropped).mean()
        self.log_dict(metrics)

    def on_after_backward(self) -> None:
        """The micro-batch's copies per expert join its optimizer step's load, summed over ranks, after the
        backward (an activation-checkpointing recompute must see the load its forward saw)."""
        if self._moes and self._pending_loads:
            record_loads(self._moes, self._pending_loads)
            self._pending_loads = []

    def optimizer_step(self, *args, **kwargs):
        """After the update: each MoE layer's expert bias moves against its step's load (expert_bias), and the
        load restarts; moe/step_load_cv is that load's spread over the global batch."""
        out = super().optimizer_step(*args, **kwargs)
        if self._moes:
            self._end_step()
        return out

    def _end_step(self) -> None:
        cvs = [m.end_step() for m in self._moes]
        metrics = {"moe/step_load_cv": torch.stack(cvs).mean()}
        biased = [(i, m.selection_bias) for i, m in zip(self.model.moe_layers, self._moes)]
        biased = [(i, b) for i, b in biased if b is not None]
        if biased:
            metrics["moe/expert_bias_absmax"] = torch.stack([b.abs().max() for _, b in biased]).max()
            for i, b in biased:  # only the spread matters: a bias common to every expert changes no choice
                metrics[f"moe/layer{i}_bias_spread"] = b.max() - b.min()
        self.log_dict(metrics)

    def _watch_collapse(self, router, tokens: int) -> None:
        """Counts, on the device, consecutive micro-batches in which one expert takes more than collapse_share
        of the tokens; ``_check_step`` warns once the count reaches collapse_steps."""
        if self.collapse_share >= 1.0:
            return
        share = torch.stack([r.tokens_per_expert.max() for r in router]).max() / tokens  # of tokens, not copies
        before = self._collapsed_for if self._collapsed_for is not None else torch.zeros_like(share)
        self._collapsed_for = torch.where(share > self.collapse_share, before + 1, torch.zeros_like(before))
        self.log("moe/router_collapse", (self._collapsed_for >= self.collapse_steps).float())

    def on_validation_epoch_start(self):
        self._val_sum = self._val_windows = None

    def validation_step(self, batch, batch_idx):
        """Sums each window's mean token loss (a window a rank holds only as padding weighs 0, see
        ``harness.data.RankShard``); ``on_validation_epoch_end`` divides by the windows over all ranks, so
        val/loss is the mean over the validation windows on 1 or N devices alike. Eager even where the blocks were
        compiled: eval mode under inference mode is a new graph per block, compiled at the fit's first validation
        (seconds a job, against a pass that eager runs in about one)."""
        x, y, *weight = batch
        with torch.compiler.set_stance("force_eager"):  # see ``evaluate``: no eval-mode graphs for one pass
            logits = self.model(x).logits.float()
        per_window = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        per_window = per_window.view(y.shape).mean(1)
        w = weight[0].to(per_window) if weight else torch.ones_like(per_window)
        s, n = (per_window * w).sum(), w.sum()
        self._val_sum = s if self._val_sum is None else self._val_sum + s
        self._val_windows = n if self._val_windows is None else self._val_windows + n
        if batch_idx == 0 and self.tokens_per_step:  # the x-axis value in val/loss's own row (W&B plots by FLOPs)
            self.log("flops/train_total", _host(self.global_step * self.tokens_per_step * self.flops_per_token))

    def on_validation_epoch_end(self):
        if self._val_sum is None:
            return
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_windows]), reduce_op="sum")
        self.log("val/loss", total[0] / total[1], prog_bar=True)

    def configure_optimizers(self):
        named = [(_clean(n), p) for n, p in self.model.named_parameters()]
        decay = [p for n, p in named if n not in self._no_decay]
        no_decay = [p for n, p in named if n in self._no_decay]
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.optim.fused
        if fused == "auto":
            fused = all(p.is_cuda for p in self.model.parameters()) if torch.cuda.is_available() else False
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, betas=(self.optim.beta1, self.optim.beta2), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.optim.lr_factor(s, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        """Clip here rather than through the Trainer: Lightning's AMP plugin refuses to clip for
        fused AdamW, and bf16 needs no gradient unscaling."""
        self.log("lr", _host(optimizer.param_groups[0]["lr"]))
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")  # inf: measure, do not clip
        root = self.trainer.strategy.model if self._trainer is not None else None
        if type(root).__name__ == "FullyShardedDataParallel":  # sharded grads: the norm needs a collective
            norm = root.clip_grad_norm_(clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.log("train/grad_norm", norm)
        guards = self._guards(norm)
        if getattr(optimizer, "defaults", {}).get("fused"):
            self._guard_on_device(optimizer, guards)
        else:
            self._check_step(self.global_step, guards.tolist())

    def _guards(self, norm: torch.Tensor) -> torch.Tensor:
        """[gradient norm, all losses finite, collapsed micro-batches in a row], on the device."""
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool, device=norm.device)
        collapsed = self._collapsed_for if self._collapsed_for is not None else torch.zeros((), device=norm.device)
        self._loss_ok = None
        return torch.stack([norm.float(), loss_ok.float(), collapsed.float()])

    def _guard_on_device(self, optimizer, guards: torch.Tensor) -> None:
        """Fused AdamW skips the update (and its step count) when ``found_inf`` is nonzero, as under a
        GradScaler: a bad step leaves the weights as they were without a host sync. The guards go to the host
        asynchronously; the previous step's are read now, by which time the GPU has long finished them."""
        norm, finite = guards[0], guards[1] > 0
        bad = ~finite | ~torch.isfinite(norm)
        if self.max_grad_norm is not None:
            bad = bad | (norm > self.max_grad_norm)
        optimizer.found_inf = bad.float()
        self.check_deferred()
        if guards.is_cuda:
            host = torch.empty(guards.shape, dtype=guards.dtype, pin_memory=True)
            host.copy_(guards, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = guards, None
        self._deferred = (self.global_step, host, ready)

    def check_deferred(self) -> None:
        """Reads the guards of the last step whose check was deferred (fused AdamW); also called once the fit
        ends, for its last step."""
        if self._deferred is None:
            return
        step, host, ready = self._deferred
        self._deferred = None
        if ready is not None:
            ready.synchronize()
        self._check_step(step, host.tolist(), "its update skipped")

    def on_train_end(self) -> None:
        self.check_deferred()

    def _check_step(self, step: int, guards: list[float], action: str = "stopping before the update") -> None:
        """The guards of one optimizer step, read on the host: a bad one raises, a long collapse warns."""
        value, finite, streak = guards
        hint = f"{action}; {self._last_good()}(lower optim.lr or raise optim.warmup_steps)"
        if not finite:
            raise FloatingPointError(f"non-finite training loss at step {step}: {hint}")
        if not math.isfinite(value) or (self.max_grad_norm is not None and value > self.max_grad_norm):
            raise FloatingPointError(
                f"gradient norm {value:.4g} at step {step} is not finite or exceeds "
                f"train.max_grad_norm={self.max_grad_norm}: {hint}"
            )
        if streak >= self.collapse_steps and not self._collapse_warned:
            warnings.warn(
                f"router collapse: one expert has taken > {self.collapse_share:.0%} of the tokens for "
                f"{self.collapse_steps} steps (step {step}); consider a larger moe.aux_loss_coef"
            )
        self._collapse_warned = streak >= self.collapse_steps

    def _last_good(self) -> str:
        """Names the checkpoint to go back to only when there is one."""
        from pathlib import Path

        last = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        return f"{last} is the last good state " if last.exists() else "no checkpoint was saved before it "


def _host(value: float) -> torch.Tensor:
    """A number the host knows, as a CPU tensor for ``self.log``. Lightning turns a Python number into a tensor on
    the module's device: a blocking host-to-device copy, which waits for the GPU's queue to drain (a stream sync
    per logged number, six per training step)."""
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


def _clean(name: str) -> str:
    """A parameter name without the prefixes that FSDP, checkpoint wrappers and torch.compile add."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def mean_loss(batch_loss, loader, device: torch.device | str = "cpu") -> float:
    """The validation loss as results.json reports it: ``batch_loss(x, y)`` (a batch's mean token loss) averaged
    over the loader's windows (a short last batch weighs its windows, not a whole batch), without gradients, on
    ``device``. One definition, so the harness's numbers, the curve Lightning logs (``LitLM.validation_step``) and
    an outside model's check of them (``analysis/hf_check.py``) average the same way."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(batch_loss(x.to(device), y.to(device))) * len(x)  # windows are equal length
            n += len(x)
    return total / max(n, 1)


def evaluate(model: Decoder, loader, device: torch.device | str = "cpu") -> float:
    """Mean LM loss over a loader (plain torch, fp32: the before/after numbers in results.json), on
    ``device``; the model goes back to where it was. Eager even where the blocks were compiled for training:
    fp32 in eval mode is a new graph for every block (a recompile: 12.7 s of a 200-step E8G1T2 job on an H200,
    for one pass that eager runs in ~3 s)."""
    was_training, home = model.training, next(model.parameters()).device
    model.eval().to(device)
    with torch.compiler.set_stance("force_eager"):
        loss = mean_loss(lambda x, y: model(x, y).loss.item(), loader, device)
    model.train(was_training).to(home)
    return loss
