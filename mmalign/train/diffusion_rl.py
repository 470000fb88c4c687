"""Group RL on text-to-image models -- GRPO (Flow-GRPO / DDPO), DiffusionNFT and AWM -- as online rounds of the
``diffusion`` recipe (``loss.name`` grpo / nft / awm with ``online:``), for SD / SDXL UNets and SD3 / Flux alike.

The components, LoRA / full fine-tuning, reference (adapters off, or a frozen copy), online driver, rewards,
panel, guard and export are the ``diffusion`` recipe's; only the rows (``diffusion.rl.RLRounds``: every sample
with its group advantage) and ``compute`` differ:

* grpo -- recompute the guided prediction (classifier-free guidance as in the rollout, gradient through both
  branches, as flow_grpo since 1f4ca40) at each recorded window step, the log-density of the drawn next latent
  (``StepSampler.score``), PPO clip on the ratio to the rollout's log-prob, KL = mean_D (mu - mu_ref)^2 / (2 s^2)
  to the reference (flow: s = sigma_t, flow_grpo's form; DDIM: the step's std).
* nft / awm -- a forward-process loss on the final latent at a fresh (t, noise): t one of the sampler's own steps
  (uniform over them; the authors loop over 9 of 10 / 6 per sample inside a step -- here one per sample and step,
  a new one every step), the conditional prediction (their CFG-free training), the old policy's prediction (NFT)
  or AWM's weighted flow-matching log-likelihood, KL to the reference (and AWM's anchor).
"""
from __future__ import annotations

import torch

from mmalign.diffusion.families import Cond
from mmalign.diffusion.rl import RLRounds, SampleBatch
from mmalign.utils import example_generator

from .diffusion import DiffusionRecipe
from .loop import StepOutput

Tensor = torch.Tensor


def _repeat(c: Cond | None, k: int) -> Cond | None:
    if c is None or k == 1:
        return c
    r = lambda x: None if x is None else x.repeat_interleave(k, 0)  # noqa: E731
    return Cond(r(c.embeds), r(c.pooled), r(c.time_ids), c.txt_ids)


class DiffusionRLRecipe(DiffusionRecipe):
    rounds_cls = RLRounds

    def __init__(self, cfg, accelerator, components=None, scorer=None):
        super().__init__(cfg, accelerator, components, scorer)
        self.hp = dict(cfg.loss.params)  # the objective's own settings (DiffusionRecipe takes 'beta' as DPO's)
        o, kind = cfg.online, self.loss_fn.kind
        self.old = None
        if kind == "flow_mix" or (kind == "flow_ratio" and float(self.hp.get("anchor_beta", 0.0)) > 0):
            from mmalign.diffusion.rl import OldPolicy  # the slow policy: only for NFT and AWM's anchor

            self.old = OldPolicy(self._named_trainable())
        self.old_max = o.old_decay_max if kind == "flow_mix" else min(o.old_decay_max, 0.3)

    # ------------------------------------------------------------------ the slow policy and its state

    def before_round(self, step: int):
        """old <- lam old + (1 - lam) theta, lam = min(rate x step, max) (NFT after each epoch; at step 0 old = theta)."""
        if self.old is not None:
            self.old.update(min(self.cfg.online.old_decay_rate * step, self.old_max))

    def trainable_state(self) -> dict[str, Tensor]:
        state = super().trainable_state()
        if self.old is not None:
            state.update(self.old.state())
        return state

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        old = {k: v for k, v in state.items() if k.startswith("old/")}
        super().load_trainable_state({k: v for k, v in state.items() if not k.startswith("old/")})
        if self.old is not None:
            self.old.load(old)

    # ------------------------------------------------------------------ the step

    def compute(self, batch: SampleBatch, step: int = 0, split: str = "train") -> StepOutput:
        dev = self.acc.device
        sampler = self.online.source.sampler(self.pipe)
        cond, uncond = sampler.condition(self.pipe, batch.captions, dev)
        if self.loss_fn.kind == "policy_ratio":
            return self._grpo(batch, sampler, cond, uncond)
        return self._forward_process(batch, step, sampler, cond)

    def _grpo(self, batch: SampleBatch, sampler, cond: Cond, uncond: Cond | None) -> StepOutput:
        dev = self.acc.device
        b, w = batch.steps.shape
        x, xn, steps = batch.x.flatten(0, 1).to(dev), batch.x_next.flatten(0, 1).to(dev), batch.steps.flatten()
        c, u = _repeat(cond, w), _repeat(uncond, w)
        with torch.no_grad(), self.reference.context() as ref:
            _, mean_ref, _ = sampler.score(x, sampler.predict(ref, x, steps, c, u), steps, xn)
        logp, mean, scale = sampler.score(x, sampler.predict(self.model, x, steps, c, u), steps, xn)
        kl = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * scale.view(-1) ** 2)).view(b, w).mean(1)
        loss, m = self.loss_fn(logp.view(b, w), batch.old_logp.to(dev), batch.advantages.to(dev), kl=kl, **self.hp)
        return StepOutput(loss, m)

    def _forward_process(self, batch: SampleBatch, step: int, sampler, cond: Cond) -> StepOutput:
        """NFT / AWM: the final latents at one of the sampler's steps per sample with fresh noise (keyed draws)."""
        dev, fam = self.acc.device, self.family
        gens = [example_generator(self.cfg.train.seed, step, int(r), salt=5) for r in batch.index]
        last = len(sampler.times()) - (1 if fam.flow else 0)
        idx = torch.stack([torch.randint(0, last, (1,), generator=g) for g in gens]).view(-1)
        t = sampler.times()[idx].to(dev)
        x0 = batch.latents.to(dev)
        noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens]).to(dev)
        x_t, target = fam.noisy_and_target(x0, noise, t)
        anchored = self.old is not None
        with torch.no_grad():  # predictions with other weights first: a swap after the forward would corrupt its graph
            old_pred = None
            if anchored:
                with self.old.swapped():
                    old_pred = fam.predict(self.unet, x_t, t, cond).float()
            with self.reference.context() as ref:
                ref_pred = fam.predict(ref, x_t, t, cond).float()
        pred = fam.predict(self.model, x_t, t, cond).float()
        adv = batch.advantages.to(dev)
        if self.loss_fn.kind == "flow_mix":
            loss, m = self.loss_fn(pred, old_pred, x0, lambda v: fam.x0_from(x_t, v, t), adv, ref_pred=ref_pred,
                                   **self.hp)
            return StepOutput(loss, m)
        logp = self._awm_logp(pred, target, t)
        anchor = ((pred - old_pred) ** 2).mean(dim=(1, 2, 3)) if anchored else None
        kl = ((pred - ref_pred) ** 2).mean(dim=(1, 2, 3))
        loss, m = self.loss_fn(logp, logp.detach(), adv, kl=kl, anchor_kl=anchor, **self.hp)
        return StepOutput(loss, m)

    def _awm_logp(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """AWM's log-likelihood of the sample: -mean_D (pred - target)^2 in fp64, weighted: ``uniform``, or ``ghuber``
        -((l + 1e-10)^p - 1e-10^p) t / p (their default, p = 0.25; t in [0, 1]: sigma, or timestep / T for UNets)."""
        loss = ((pred.double() - target.double()) ** 2).mean(dim=tuple(range(1, pred.dim())))
        o = self.cfg.online
        if o.awm_weighting == "uniform":
            return -loss
        tt = t.double() if self.family.flow else t.double() / self.family.scheduler.config.num_train_timesteps
        p = o.ghuber_power
        return -((loss + 1e-10) ** p - 1e-10 ** p) * tt / p
