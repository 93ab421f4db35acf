"""Metrics that say whether a model is good.

- `shapes_suite`: generate for fixed prompts with fixed seeds and score each image with the
  shapes analyzer (colour / shape / position / background accuracy, seen vs held-out pairs).
- `vae_suite`: reconstruction PSNR and SSIM on held-out images from any data source.
- `sampler_agreement`: PNDM vs LMS from the same noise, and each one's convergence to its own
  200-step result as the step count grows.
- `fid_suite`: FID and CLIP score where the Inception / CLIP weights can be loaded from a local
  file; otherwise a clear message saying what is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from t2i import rng
from t2i.data import build_loader
from t2i.data import shapes
from t2i.sample import Pipeline, generate, make_grid

ATTRIBUTES = ("colour", "shape", "position", "background")


class MissingWeights(RuntimeError):
    """A metric needs weights that are not available offline; the message says which."""


# ----------------------------------------------------------------------------------------------
# Image metrics
# ----------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # (size, size)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5) on images
    mapped to [0, 1], averaged over channels and valid positions."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    c = x.shape[1]
    w = _gaussian_window().to(x.device).expand(c, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    var_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    var_y = F.conv2d(y * y, w, groups=c) - mu_y**2
    cov = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------


def shapes_suite(pipe: Pipeline, n: int = 60, n_held_out: int = 24, sampler: str = "pndm",
                 steps: int = 50, guidance: float = 5.0, seed: int = 0,
                 batch_size: int = 32, out_dir: Path | None = None) -> dict[str, Any]:
    """Prompt adherence judged by the shapes analyzer, for seen and held-out colour+shape pairs."""
    report: dict[str, Any] = {"suite": "shapes", "sampler": sampler, "steps": steps,
                              "guidance": guidance, "seed": seed}
    failures = []
    for split, seen, count in (("seen", True, n), ("held_out", False, n_held_out)):
        cases = shapes.eval_cases(seen, count)
        result = generate(pipe, [p for p, _ in cases], sampler=sampler, steps=steps,
                          guidance=guidance, seed=seed, batch_size=batch_size)
        hits = {name: 0 for name in (*ATTRIBUTES, "all")}
        for (prompt, target), image, s in zip(cases, result.images, result.seeds):
            scored = shapes.score(target, shapes.analyze(np.asarray(image)))
            for name, ok in scored.items():
                hits[name] += int(ok)
            if not scored["all"]:
                failures.append((np.asarray(image), prompt, s))
        report[split] = {"n": count, **{f"{k}_accuracy": v / count for k, v in hits.items()}}
    report["failures"] = [{"prompt": p, "seed": s} for _, p, s in failures]
    if out_dir is not None and failures:
        out_dir.mkdir(parents=True, exist_ok=True)
        make_grid(np.stack([img for img, _, _ in failures[:64]]), columns=8).save(
            out_dir / "shapes_failures.png")
    return report


@torch.no_grad()
def vae_suite(pipe: Pipeline, source: str, n: int = 256, batch_size: int = 32,
              seed: int = 12345) -> dict[str, Any]:
    """Reconstruction PSNR / SSIM of the posterior mean on `n` images from `source`."""
    from t2i.models.text import tokenize
    import dataclasses
    data_cfg = dataclasses.replace(pipe.cfg.data, source=source, shuffle_buffer=0
                                   if source == "shapes" else pipe.cfg.data.shuffle_buffer)
    loader = build_loader(data_cfg, batch_size=batch_size, tokenize=tokenize,
                          seed=rng.derive_seed(seed, "vae-eval"))
    psnrs, ssims, it = [], [], iter(loader)
    while sum(len(p) for p in psnrs) < n:
        x = next(it)["image"].to(pipe.device)
        recon = pipe.vae.decode(pipe.vae.encode(x).mode()).clamp(-1, 1)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
    p, s = torch.cat(psnrs)[:n], torch.cat(ssims)[:n]
    return {"suite": "vae", "source": source, "n": n, "psnr_db": p.mean().item(),
            "psnr_db_min": p.min().item(), "ssim": s.mean().item()}


@torch.no_grad()
def sampler_agreement(pipe: Pipeline, prompts: list[str], seed: int = 0, guidance: float = 5.0,
                      steps_list: tuple[int, ...] = (10, 25, 50, 100),
                      reference_steps: int = 200) -> dict[str, Any]:
    """Mean |latent difference| between PNDM and LMS at 50 steps from the same noise, and each
    sampler's distance to its own `reference_steps` result as steps grow."""
    def run(sampler: str, steps: int) -> torch.Tensor:
        return generate(pipe, prompts, sampler=sampler, steps=steps, guidance=guidance,
                        seed=seed, batch_size=len(prompts)).latents

    report: dict[str, Any] = {"suite": "samplers", "n": len(prompts), "guidance": guidance}
    report["pndm_vs_lms_50"] = (run("pndm", 50) - run("lms", 50)).abs().mean().item()
    for sampler in ("pndm", "lms"):
        ref = run(sampler, reference_steps)
        report[f"{sampler}_distance_to_{reference_steps}"] = {
            str(s): (run(sampler, s) - ref).abs().mean().item() for s in steps_list}
    return report


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor,
                     s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), in float64; the
    trace of the matrix square root is the sum of sqrt eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    evals, evecs = torch.linalg.eigh(s1)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * middle)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def inception_features(weights: str | None):
    """torchvision's Inception-v3 pool features from a local weights file, or MissingWeights."""
    if not weights or not Path(weights).is_file():
        raise MissingWeights(
            "FID needs Inception-v3 weights, which cannot be downloaded here: pass --inception "
            "PATH to torchvision's inception_v3 IMAGENET1K_V1 state dict (.pth)")
    import torchvision
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    model.fc = torch.nn.Identity()
    return model.eval()


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
