"""AdamW whose momentum, not its gradient, crosses the network compressed: 1-bit Adam (Tang et al. 2021).

Compressing the gradient under Adam fails: Adam divides each coordinate by its own RMS, so the compression
error of small coordinates is blown up (on ``gradq-bench --workload charlm`` every compressor ends far above
fp32's perplexity). 1-bit Adam's remedy, built here on gradq's compressors and compressed allreduce:

1. Warm-up (``warmup_steps``): plain AdamW on the fp32-allreduced mean gradient (equal to
   ``torch.optim.AdamW``, to rounding).
2. Then the variance ``v`` is frozen, giving every rank the same ``d = sqrt(v / (1 - beta2^t)) + eps``, DDP
   stops reducing gradients (its hook returns each rank's own), and ``step()`` reduces the momentum
   instead, compressed, as ``m / d``: since d is common that averages to (mean m) / d, and the code's
   per-block scale sees Adam-normalized values of like magnitude rather than momenta whose sizes differ
   by orders (a coordinate with a small v would turn its block's scale into a huge step). With error
   feedback (onebit) every rank holds the same momentum: it sends ``(beta1 m + (1 - beta1) g) / d`` and m
   becomes the compressed mean times d. Without it (terngrad, qsgd) each rank keeps its own exact
   ``m_r = beta1 m_r + (1 - beta1) g_r`` and sends ``m_r / d``, so compression noise is not fed back into m.
3. The update is AdamW's with that d: ``p -= lr wd p``; ``p -= lr / (1 - beta1^t) (mean m / d)``. Each
   ``m / d`` is first clamped to +-(1 - beta1) / sqrt(1 - beta2) (3.16 at the defaults), the most one
   gradient spike after a quiet spell gives in Adam, whose v takes in the spike at once. A frozen v cannot:
   a unit that wakes up after the freeze, its v near 0, would otherwise step by about g / sqrt(v), which
   on digits took a weight to 1e9 in two steps and, through the code's shared block scale, its neighbours.
4. Every ``variance_interval``-th step after the warm-up (0: never) is an fp32 step again: DDP reduces the
   gradient, v is updated as if each of the k steps since its last update had had this step's squared
   gradient (``v = beta2^k v + (1 - beta2^k) g^2``), d is recomputed, and ranks whose own momenta differ
   continue from their reduced mean. On charlm a v frozen for good costs 2.7% of perplexity even
   uncompressed (6.09 against fp32's 5.93); refreshed every 50 steps that run reached 5.83, and with
   refreshes every 100 steps TernGrad's compressed momentum reached 5.92 (benchmarks/RESULTS.md).

A coordinate whose ``v`` is still 0 when d is computed (no gradient yet, e.g. the embedding of a token not
yet seen) takes the mean ``v`` of its tensor instead: with eps alone its first gradient would move it by
about lr / eps.

A step whose reduced value holds NaN/Inf (a rank's gradient overflowed) changes nothing on any rank: the
non-finite values reach every rank through the collective, and every rank skips the step
(``skipped_steps`` counts them). So do not wrap it in AMP's GradScaler, whose per-rank skip would desert
the collective after the warm-up; autocast in bf16 needs no scaler.
"""

import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from comm_hooks.ddp import HookStats, TorchTransport
from gradq.allreduce import CompressedAllreduce, Mode, ensure_same_settings, ring_allreduce_bytes
from gradq.compressors import Compressor


class CompressedAdamW(torch.optim.Optimizer):
    """AdamW over all trainable parameters of ``ddp_model`` that compresses the momentum after a warm-up.

    Registers its own communication hook on ``ddp_model`` (do not also call ``comm_hooks.register`` on it);
    create it on every rank, in the same order. ``compressor``, ``mode``, ``error_feedback``, ``seed`` and
    ``compressor_options`` are those of :class:`gradq.CompressedAllreduce`; ``warmup_steps`` (>= 1) uncompressed
    AdamW steps come first (1-bit Adam uses 15-25% of training), then one fp32 step every
    ``variance_interval`` steps (default 100; 0 freezes v for good, as 1-bit Adam does). ``stats`` counts the
    bytes each step sent (a :class:`comm_hooks.HookStats`). ``param_groups[0]["lr"]`` may be changed between
    steps (LR schedulers work).
    """

    def __init__(
        self,
        ddp_model: DistributedDataParallel,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        warmup_steps: int,
        variance_interval: int = 100,
        compressor: str | Compressor = "onebit",
        mode: Mode = "two_phase",
        error_feedback: bool | None = None,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        **compressor_options: object,
    ) -> None:
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(f"CompressedAdamW needs the DistributedDataParallel model, got {type(ddp_model).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(
                f"warmup_steps must be an int >= 1 (uncompressed AdamW steps that set the variance before it is "
                f"frozen; 1-bit Adam uses about 15-25% of training), got {warmup_steps!r}"
            )
        if isinstance(variance_interval, bool) or not isinstance(variance_interval, int) or variance_interval < 0:
            raise ValueError(f"variance_interval must be an int >= 0 (0: v stays frozen), got {variance_interval!r}")
        if not (lr > 0 and eps > 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"need lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1), got {lr}, {eps}, "
                             f"{weight_decay}, {betas}")  # fmt: skip
        params = [p for p in ddp_model.module.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.warmup_steps = warmup_steps
        self.variance_interval = variance_interval
        self.allreduce = CompressedAllreduce(
            compressor, mode=mode, error_feedback=error_feedback, seed=seed, **compressor_options
        )
        self.process_group = process_group
        self.transport = TorchTransport(process_group)
        self.stats = HookStats()
        self.steps = 0
        self.skipped_steps = 0
        n = sum(p.numel() for p in params)
        self.momentum = torch.zeros(n, dtype=torch.float32, device=params[0].device if params else "cpu")
        self.variance = torch.zeros_like(self.momentum)
        self._denominator: torch.Tensor | None = None  # sqrt(v / (1 - beta2^T)) + eps, once frozen
        self._variance_step = 0  # the last step that updated v
        self._reduced: torch.Tensor | None = None  # the last reduced m / d, while ranks' own momenta differ
        self._check_agreement(n)
        ddp_model.register_comm_hook(self, _hook)

    def exact(self, t: int) -> bool:
        """Whether step t (from 1) reduces the gradient in fp32 and updates v: the warm-up, then every
        ``variance_interval``-th step."""
        after = t - self.warmup_steps
        return after <= 0 or (self.variance_interval > 0 and after % self.variance_interval == 0)

    def _check_agreement(self, numel: int) -> None:
        settings = {**self.allreduce.settings(), "warmup_steps": self.warmup_steps, "numel": numel,
                    "variance_interval": self.variance_interval, "defaults": self.defaults}  # fmt: skip

        def gather(digest: str) -> list[str]:
            everyone: list[str] = [""] * self.transport.world_size
            dist.all_gather_object(everyone, digest, group=self.process_group)
            return everyone

        ensure_same_settings(settings, gather, "CompressedAdamW")

    def _params(self) -> list[torch.nn.Parameter]:
        return self.param_groups[0]["params"]

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
            for p in self._params()
        ])  # fmt: skip

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One AdamW step (see the module docstring); collective after the warm-up: call it on every rank."""
        if closure is not None:
            raise ValueError("CompressedAdamW.step takes no closure")
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        grad = self._flat_grad()
        t = self.steps + 1
        if self.exact(t):
            if not bool(torch.isfinite(grad).all()):  # DDP's allreduce spread it: every rank skips
                self.skipped_steps += 1
                return
            # v as if each of the k steps since its last update had had this step's squared gradient
            k = t - self._variance_step
            if self._reduced is not None:  # local momenta differ: continue from their reduced mean instead
                self.momentum.copy_(self._reduced * self._denominator)
                self._reduced = None
            self.momentum.lerp_(grad, 1 - beta1)
            self.variance.mul_(beta2**k).addcmul_(grad, grad, value=1 - beta2**k)
            self._variance_step = t
            if t < self.warmup_steps:
                denominator = (self.variance.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            else:  # from here on a compressed momentum can be nonzero where v is 0 (see _frozen_denominator)
                denominator = self._denominator = self._frozen_denominator(math.sqrt(1 - beta2**t), group["eps"])
            self._apply(self.momentum / denominator, t)
            return
        momentum = torch.lerp(self.momentum, grad, 1 - beta1)
        bound = (1 - beta1) / math.sqrt(1 - beta2)  # the largest m / sqrt(v) one gradient spike gives in Adam
        sent = (momentum / self._denominator).clamp_(-bound, bound)
        out = self.allreduce(sent, self.transport, key="momentum", step=self.steps)
        self.stats.add(out.bytes_sent, ring_allreduce_bytes(4 * momentum.numel(), self.transport.world_size),
                       out.codec_seconds)  # fmt: skip
        self.stats.end_step()
        if not bool(torch.isfinite(out.mean).all()):  # a NaN/Inf on any rank reaches every rank's mean
            self.skipped_steps += 1
            return
        # with error feedback the shared compressed mean; without, this rank's own exact momentum (and the
        # reduced mean, which the next fp32 step continues from on every rank)
        if self.allreduce.error_feedback:
            self.momentum.copy_(out.mean * self._denominator)
        else:
            self.momentum.copy_(momentum)
            self._reduced = out.mean
        self._apply(out.mean, t)

    def _frozen_denominator(self, correction: float, eps: float) -> torch.Tensor:
        """sqrt(v / (1 - beta2^t)) + eps, where a coordinate that never had a gradient (v = 0, e.g. the
        embedding of a token not yet seen) takes its tensor's mean v: eps alone would turn its first gradient,
        or the magnitude a 1-bit code gives every coordinate of a block, into a step of about lr / eps."""
        variance = self.variance.clone()
        for piece in variance.split([p.numel() for p in self._params()]):
            piece.masked_fill_(piece == 0, piece.mean())
        return (variance.sqrt() / correction).add_(eps)

    def _apply(self, update: torch.Tensor, t: int) -> None:
        """AdamW's step along ``update`` = m / denominator (flat), with decoupled weight decay."""
        group = self.param_groups[0]
        lr, beta1 = group["lr"], group["betas"][0]
        offset = 0
        for p in self._params():
            n = p.numel()
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update[offset : offset + n].view_as(p), alpha=-lr / (1 - beta1**t))
            offset += n
        self.steps = t

    def reduce_bucket(self, buffer: torch.Tensor) -> torch.Tensor:
        """The hook's job for one DDP bucket: the fp32 mean during the warm-up, then this rank's own values."""
        if not self.exact(self.steps + 1):
            return buffer
        dist.all_reduce(buffer, group=self.process_group)
        world = self.transport.world_size
        fp32 = ring_allreduce_bytes(4 * buffer.numel(), world)
        self.stats.add(fp32, fp32, 0.0)
        return buffer.div_(world)

    def end_backward(self) -> None:
        """Close the warm-up step's traffic figures (called by the hook after the last bucket)."""
        if self.exact(self.steps + 1):
            self.stats.end_step()


def _hook(state: CompressedAdamW, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.reduce_bucket(bucket.buffer()))
    if bucket.is_last():
        state.end_backward()
    return future

