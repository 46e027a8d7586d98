"""The denoiser's stages: ``latents`` (the pool encoded by the VAE) and ``unet`` (with :class:`WordTokens`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hifi.io.images import atomic_path
from hifi_backends.toy.training.bundle import _save_model_dir
from hifi_backends.toy.training.data import Pool, train_caption
from hifi_backends.toy.training.loop import Plan, _loop, _schedule
from hifi_backends.toy.training.settings import TrainSettings, _device


def stage_latents(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    dev = _device(s)
    pool = Pool(work, dev)
    folder = Path(s.unet_init) / "vae" if s.unet_init else work / "vae_final"
    vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).float().to(dev).eval()
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(pool), 256), desc="encode pool"):
            x = pool.batch(torch.arange(start, min(start + 256, len(pool)))) * 2 - 1
            chunks.append(vae.encode(x).latent_dist.mean.cpu())
    latents = torch.cat(chunks)
    # Going on from a bundle: its UNet learned latents at the bundle's scaling factor.
    scale = float(vae.config.scaling_factor) if s.unet_init else float(1.0 / latents.std())
    with atomic_path(work / "latents.pt") as tmp:
        torch.save({"latents": latents * scale, "scaling_factor": scale}, tmp)
    return {"scaling_factor": scale, "count": len(latents), "init": s.unet_init}


def stage_unet(work: Path, s: TrainSettings) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hifi.kernels.ddim import Schedule, add_noise
    from hifi_backends.configs import load_config
    from hifi_backends.toy.models import unet_config

    dev = _device(s)
    pool = Pool(work, dev)
    latents = torch.load(work / "latents.pt", weights_only=True)["latents"].to(dev)
    init = Path(s.unet_init) if s.unet_init else None
    tokenizer = CLIPTokenizer.from_pretrained(init / "tokenizer" if init else work / "tokenizer")
    # ``unet_text="metric"``: attend to the metric ToyCLIP's text tower instead of the ``clip``
    # stage's. The clip stage's tower gives the class word nearly the same hidden state for
    # every class (cosine 0.88 on average at the class token, up to 0.99); the metric tower,
    # trained against swapped class words, -0.03 (README, ToyWorld).
    if init is not None:  # the bundle's own tower, so that its UNet goes on hearing the same states
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder").float()
    elif s.unet_text in ("metric", "unet"):
        folder = "toyclip_metric" if s.unet_text == "metric" else "toyclip_unet"
        tower: Any = CLIPTextModelWithProjection.from_pretrained(work / folder / "text")
        text_encoder = CLIPTextModel(tower.config)
    else:
        tower = CLIPModel.from_pretrained(work / "toyclip")
        text_encoder = CLIPTextModel(tower.config.text_config)
    if init is None:
        text_encoder.load_state_dict(tower.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    _save_model_dir(text_encoder, work / "text_encoder")
    text_encoder.to(dev)
    schedule = Schedule.from_config(load_config("sd14", "scheduler"))
    alphas = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=dev)
    # Min-SNR-gamma (Hang et al. 2023), for epsilon prediction: weight min(SNR, gamma) / SNR,
    # so the nearly clean timesteps, whose noise is hardest to see and least about shape, stop
    # dominating the gradient. Off (all ones) when unet_snr_gamma is 0.
    snr = alphas / (1 - alphas)
    t_weight = snr.clamp(max=s.unet_snr_gamma) / snr if s.unet_snr_gamma > 0 else torch.ones_like(snr)
    # The latent's shape is the VAE's (8x8x4 for the bundle's; 16x16 for a three-level VAE).
    channels, side = int(latents.shape[1]), int(latents.shape[-1])
    factor = pool.masks.shape[-1] // side
    # The object covers a few of the latent cells; unet_object_weight adds weight there
    # (its fraction of each cell, from the exact masks), as vae_detail does in pixels.
    cell_cover = F.avg_pool2d(pool.masks[:, None].float(), factor) if s.unet_object_weight > 0 else None
    # unet_detail_weight: more weight again where the pattern and the mark are (their fraction of
    # each cell, from the renderer's geometry): the details a mean prediction blurs away first.
    detail_cover = _detail_cover(pool, factor).to(dev) if s.unet_detail_weight > 0 else None

    torch.manual_seed(s.seed + 5)
    config = unet_config(cross_attention_dim=text_encoder.config.hidden_size, width=s.unet_width, layers=s.unet_layers,
                         latent_side=side, latent_channels=channels)
    unet = UNet2DConditionModel(**config)
    if init is not None:
        start = UNet2DConditionModel.from_pretrained(init / "unet")
        found = (tuple(start.config.block_out_channels), start.config.layers_per_block)
        if found != (tuple(s.unet_width), s.unet_layers):
            raise ValueError(f"{init / 'unet'} has block_out_channels {found[0]} and {found[1]} layer(s) per block;"
                             f" the settings ask for {tuple(s.unet_width)} and {s.unet_layers}: set unet_width and"
                             " unet_layers to the bundle's")
        unet.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    ema = UNet2DConditionModel(**config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    unet.to(dev)
    ema.to(dev)
    params, ema_params = list(unet.parameters()), list(ema.parameters())  # once, not every step
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 5)
    rng = np.random.default_rng(s.seed + 5)
    decay = 0.998
    plan = Plan(s.unet_steps, s.unet_seconds, probe=(20, 180))
    words = WordTokens(tokenizer)
    sample = [train_caption(o, np.random.default_rng(k), s) for k, o in enumerate(pool.objects[:256])]
    token_ids = words if words.matches(sample) else words.reference

    def step(i: int) -> Tensor:
        _schedule(opt, s.unet_lr, i, plan.total, warmup=200)
        index = torch.randint(len(pool), (s.unet_batch,), generator=gen)
        texts = [train_caption(pool.objects[k], rng, s) for k in index.tolist()]
        ids = token_ids(texts).to(dev)
        with torch.no_grad():
            cond = text_encoder(ids)[0]
        index = index.to(dev)
        x0 = latents[index]
        t = torch.randint(0, schedule.num_train_timesteps, (s.unet_batch,), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        x_t = add_noise(x0, noise, (alphas[t].sqrt(), (1 - alphas[t]).sqrt()))
        err = (unet(x_t, t, encoder_hidden_states=cond).sample - noise).pow(2)
        if cell_cover is not None or detail_cover is not None:
            w = torch.ones_like(err[:, :1])
            if cell_cover is not None:
                w = w + s.unet_object_weight * cell_cover[index]
            if detail_cover is not None:
                w = w + s.unet_detail_weight * detail_cover[index]
            err = err * (w / w.mean(dim=(2, 3), keepdim=True))
        loss = (err.mean(dim=(1, 2, 3)) * t_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(decay, (1 + i) / (10 + i))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        return loss.detach()

    stats = _loop("unet", work, plan, step, {"model": unet, "ema": ema, "opt": opt}, every=250)
    _save_model_dir(ema.cpu(), work / "unet")
    return {**stats, "init": s.unet_init}


def _detail_cover(pool: Pool, factor: int = 8) -> Tensor:
    """``[N, 1, 64 / factor, 64 / factor]``: the fraction of each latent cell the pool images' pattern and
    mark cover (``factor``: the VAE's, pixels per latent cell along a side)."""
    from hifi.toyworld.world import detail_coverage

    pixels = np.stack([detail_coverage(o) for o in tqdm(pool.objects, desc="detail masks")])
    return F.avg_pool2d(torch.from_numpy(pixels)[:, None], factor)


class WordTokens:
    """A CLIP tokenizer's ids for captions of whole words, from a per-word cache.

    The slow (Python) CLIP tokenizer took 36 ms for a batch of 256 captions on this CPU, a
    third of a GPU UNet step; captions rarely repeat but their words do. CLIP's BPE works
    word by word, so a caption's ids are BOS, its words' ids, EOS, then padding (truncated
    to the context as the tokenizer does). :meth:`matches` checks that against the tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.length = int(tokenizer.model_max_length)
        self.cache: dict[str, list[int]] = {}

    def reference(self, texts: list[str]) -> Tensor:
        """The tokenizer's own ids (padded to the context, truncated)."""
        return cast(Tensor, self.tokenizer(texts, padding="max_length", max_length=self.length, truncation=True,
                                           return_tensors="pt").input_ids)

    def __call__(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer
        rows = []
        for text in texts:
            ids: list[int] = []
            for word in text.split():
                if word not in self.cache:
                    self.cache[word] = tok(word, add_special_tokens=False).input_ids
                ids += self.cache[word]
            ids = [tok.bos_token_id, *ids[: self.length - 2], tok.eos_token_id]
            rows.append(ids + [tok.pad_token_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def matches(self, texts: list[str]) -> bool:
        """Whether the cached path gives exactly the tokenizer's ids on ``texts``."""
        return bool(torch.equal(self(texts), self.reference(texts)))
