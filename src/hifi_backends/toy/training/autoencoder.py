"""The VAE stages: ``vae`` (the AutoencoderKL), then ``vae_detail`` (the object's pixels weighted 5x)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hifi_backends.toy.training.bundle import _save_model_dir
from hifi_backends.toy.training.data import Pool
from hifi_backends.toy.training.loop import Plan, _loop, _schedule
from hifi_backends.toy.training.settings import TrainSettings, _device


def stage_vae(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from hifi_backends.toy.models import vae_config

    dev = _device(s)
    pool = Pool(work, dev)
    torch.manual_seed(s.seed + 1)
    vae = AutoencoderKL(**vae_config(s.vae_width, s.latent_channels)).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 1)
    plan = Plan(s.vae_steps, s.vae_seconds, probe=(10, 90))

    def step(i: int) -> Tensor:
        _schedule(opt, 1e-3, i, plan.total)
        x = pool.batch(torch.randint(len(pool), (s.vae_batch,), generator=gen)) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return F.mse_loss(recon.detach(), x)

    stats = _loop("vae", work, plan, step, {"model": vae, "opt": opt})
    vae.eval()
    with torch.no_grad():
        x = pool.batch(torch.arange(min(256, len(pool)))) * 2 - 1
        stats["eval_mse"] = float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    _save_model_dir(vae.cpu(), work / "vae")
    return stats


def stage_vae_detail(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    dev = _device(s)
    pool = Pool(work, dev)
    torch.manual_seed(s.seed + 7)
    vae = AutoencoderKL.from_pretrained(work / "vae", low_cpu_mem_usage=False).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 7)
    plan = Plan(s.vae_detail_steps, s.vae_seconds, probe=(10, 45))

    def step(i: int) -> Tensor:
        _schedule(opt, 5e-4, i, plan.total, warmup=50)
        index = torch.randint(len(pool), (s.vae_batch,), generator=gen).to(dev)
        x = pool.batch(index) * 2 - 1
        weight = 1.0 + 4.0 * pool.masks[index].float()[:, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        err = recon - x
        loss = (weight * err.pow(2)).mean() + 0.5 * (weight * err.abs()).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return err.detach().pow(2).mean()

    stats = _loop("vae_detail", work, plan, step, {"model": vae, "opt": opt})
    vae.eval()
    with torch.no_grad():
        index = torch.arange(min(256, len(pool)), device=dev)
        x = pool.batch(index) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        mask = pool.masks[index][:, None].expand_as(x)
        stats["eval_mse"] = float(F.mse_loss(recon, x))
        stats["eval_mse_object"] = float((recon - x).pow(2)[mask].mean())
    _save_model_dir(vae.cpu(), work / "vae_final")
    return stats
