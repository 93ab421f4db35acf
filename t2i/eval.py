"""Metrics that say whether a model is good.

- `shapes_suite`: generate for fixed prompts with fixed seeds and score each image with the
  shapes analyzer (colour / shape / position / background accuracy, seen vs held-out pairs).
- `vae_suite`: reconstruction PSNR, SSIM, sharpness (`sharpness_ratio`: high-frequency
  spectral energy of the reconstructions over that of the originals, no network needed) and,
  with Inception weights, reconstruction FID, on held-out images from any data source.
- `sampler_agreement`: PNDM vs LMS from the same noise, and each one's convergence to its own
  200-step result as the step count grows.
- `fid_suite`: FID and CLIP score against real images, with feature extractors built from local
  weight files (`inception_features`, `clip_scorer`); without them, `MissingWeights` says what
  is missing.

Suites return JSON-able dicts (plus images where they have some); writing files is the CLI's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2i import rng
from t2i.config import Config
from t2i.data import DataError, build_loader
from t2i.data.loader import latent_folder
from t2i.data import shapes
from t2i.models.io import WeightsError, load_into, read_state_dict
from t2i.sample import Pipeline, generate, make_grid

ATTRIBUTES = ("colour", "shape", "position", "background")
Features = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [-1, 1] -> (B, D)
ClipScore = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images, prompts -> (B,)


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
    mapped to [0, 1], averaged over channels and valid positions. Images smaller than the
    window use a window as large as the image allows (odd side)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    c, size = x.shape[1], min(11, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)
    w = _gaussian_window(size).to(x.device).expand(c, 1, size, size)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    var_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    var_y = F.conv2d(y * y, w, groups=c) - mu_y**2
    cov = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
HIGHFREQ_CUTOFF = 0.25  # cycles/pixel: half the Nyquist frequency (0.5)


def highfreq_energy(images: torch.Tensor, cutoff: float = HIGHFREQ_CUTOFF,
                    window: bool = True) -> torch.Tensor:
    """Per-image spectral energy of the luma above radial frequency `cutoff` (cycles/pixel).

    images (B, 3, H, W) (any range; t2i's is [-1, 1]) -> (B,) float64. In float64: luma
    Y = 0.299 R + 0.587 G + 0.114 B (BT.601); its own mean removed per image; multiplied by the
    separable symmetric Hann window w[n] = 0.5 - 0.5 cos(2 pi n / (N - 1)) along each axis
    (unless `window` is False), so the image's borders, which the 2-D DFT would wrap into a
    sharp edge, add no energy of their own; F = the unnormalised 2-D DFT (torch.fft.fft2);
    energy = sum of |F(fy, fx)|^2 over the frequencies with sqrt(fy^2 + fx^2) > cutoff, where
    fy, fx are numpy/torch `fftfreq` (cycles/pixel, in [-0.5, 0.5)). The default cutoff 0.25 is
    half the Nyquist frequency: the band holds the detail a blurry reconstruction loses."""
    x = images.double()
    luma = torch.tensor(LUMA, dtype=torch.float64, device=x.device)
    y = torch.einsum("bchw,c->bhw", x, luma)  # (B, H, W)
    y = y - y.mean(dim=(1, 2), keepdim=True)
    h, w = y.shape[-2:]
    if window:
        hann = [torch.hann_window(n, periodic=False, dtype=torch.float64, device=x.device)
                for n in (h, w)]
        y = y * hann[0][:, None] * hann[1][None, :]  # (B, H, W)
    power = torch.fft.fft2(y).abs() ** 2  # (B, H, W)
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=x.device)
    band = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff  # (H, W)
    return (power * band).sum(dim=(1, 2))


def sharpness_ratio(recon: torch.Tensor, original: torch.Tensor,
                    cutoff: float = HIGHFREQ_CUTOFF, window: bool = True) -> float | None:
    """Sum over the set of `highfreq_energy(recon)` / the same sum of `original` (both
    (N, 3, H, W), pairs in the same order): 1.0 = as much detail above `cutoff` as the
    originals, below 1 blurrier, above 1 more high-frequency energy (noise, ringing, GAN
    texture). A ratio of sums, so large detailed images weigh more than flat ones. None when
    the originals have no energy in the band (flat images): no sharpness to keep."""
    ref = highfreq_energy(original, cutoff, window).sum().item()
    return highfreq_energy(recon, cutoff, window).sum().item() / ref if ref > 0 else None


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor,
                     s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), in float64; the
    trace of the matrix square root is the sum of sqrt eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    evals, evecs = torch.linalg.eigh(s1)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * middle)


def features_frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to features x (N1, D) and y (N2, D).
    With fewer samples than dimensions the covariances have low rank: for centred A, B the
    nonzero eigenvalues of S1 S2 = A^T A B^T B / c are those of M M^T with M = A B^T, so
    Tr (S1 S2)^(1/2) is the nuclear norm of M / sqrt(c), c = (N1 - 1)(N2 - 1): no D x D matrix
    (FID's D = 2048 would take seconds per eigendecomposition on a CPU)."""
    if min(len(x), len(y)) > x.shape[1]:
        return frechet_distance(*feature_stats(x), *feature_stats(y))
    x, y = x.double(), y.double()
    a, b = x - x.mean(0), y - y.mean(0)  # (N1, D), (N2, D)
    c1, c2 = len(x) - 1, len(y) - 1
    cross = torch.linalg.svdvals(a @ b.T).sum() / (c1 * c2) ** 0.5  # Tr (S1 S2)^(1/2)
    mean_term = ((x.mean(0) - y.mean(0)) ** 2).sum()
    return float(mean_term + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * cross)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or (H, W, 3) array -> (H, W, 3) uint8."""
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [-1, 1]."""
    array = np.stack([np.asarray(i.convert("RGB")) for i in images])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# Shapes: prompt adherence read back from pixels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One image whose attributes did not all match its prompt."""

    split: str
    prompt: str
    seed: int
    found: shapes.ShapeAttrs
    image: np.ndarray  # (H, W, 3) uint8

    def as_dict(self) -> dict[str, Any]:
        found = {name: getattr(self.found, name) for name in ATTRIBUTES}
        return {"split": self.split, "prompt": self.prompt, "seed": self.seed, "found": found}


def score_split(split: str, cases: list[tuple[str, shapes.ShapeAttrs]], images: list[Any],
                seeds: list[int]) -> tuple[dict[str, Any], list[Failure]]:
    """Accuracy of each attribute (and of `all` four) over `images` (PIL or (H, W, 3) uint8)
    against the cases' targets, and the failures."""
    hits = {name: 0 for name in (*ATTRIBUTES, "all")}
    failures = []
    for (prompt, target), image, seed in zip(cases, images, seeds, strict=True):
        found = shapes.analyze(image)
        scored = shapes.score(target, found)
        for name, ok in scored.items():
            hits[name] += int(ok)
        if not scored["all"]:
            failures.append(Failure(split, prompt, seed, found, as_uint8(image)))
    n = len(cases)  # accuracies are None (JSON null) for an empty split
    return {"n": n, **{name: hits[name] / n if n else None for name in hits}}, failures


def shapes_suite(pipe: Pipeline, n: int = 60, n_held_out: int = 24, sampler: str = "pndm",
                 steps: int = 50, guidance: float = 5.0, seed: int = 0,
                 batch_size: int = 32) -> tuple[dict[str, Any], list[Failure]]:
    """Prompt adherence on `n` seen and `n_held_out` held-out colour+shape prompts; image i of
    the concatenated list (seen first) uses seed `seed + i`."""
    seen, held_out = shapes.eval_cases(True, n), shapes.eval_cases(False, n_held_out)
    result = generate(pipe, [p for p, _ in seen + held_out], sampler=sampler, steps=steps,
                      guidance=guidance, seed=seed, batch_size=batch_size)
    accuracy, failures = {}, []
    for split, cases, start in (("seen", seen, 0), ("held_out", held_out, n)):
        stop = start + len(cases)
        accuracy[split], missed = score_split(split, cases, result.images[start:stop],
                                              result.seeds[start:stop])
        failures += missed
    report = {"suite": "shapes", "n": n + n_held_out, "accuracy": accuracy,
              "failures": [f.as_dict() for f in failures]}
    return report, failures


def failures_grid(failures: list[Failure], columns: int = 8, limit: int = 64) -> Image.Image | None:
    """The first `limit` failed images in one grid (same order as the report's list)."""
    if not failures:
        return None
    images = np.stack([f.image for f in failures[:limit]])  # (N, H, W, 3)
    return make_grid(images, columns=min(columns, len(images)))


# ----------------------------------------------------------------------------------------------
# Real images from a data source
# ----------------------------------------------------------------------------------------------


def real_batches(cfg: Config, source: str, n: int, batch_size: int,
                 seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Exactly `n` real (images (b, 3, H, W) in [-1, 1], prompts) at the training resolution,
    in batches. Shards are read in a seeded order that differs from training's; a source with
    fewer than `n` images wraps around (the next epoch)."""
    from t2i.models.text import tokenize
    if latent_folder(source) is not None:  # a run trained from latent shards has no images there
        raise DataError(f"data source {source!r} holds latent shards, not images: pass the image "
                        f"shards with --data")
    data_cfg = dataclasses.replace(cfg.data, source=source, workers=0)
    loader = build_loader(data_cfg, batch_size=batch_size, tokenize=tokenize,
                          seed=rng.derive_seed(seed, "eval-data"), in_process=True)
    taken = 0
    for batch in loader:
        keep = min(n - taken, len(batch["prompt"]))
        yield batch["image"][:keep], list(batch["prompt"][:keep])
        taken += keep
        if taken >= n:
            return


@dataclass(frozen=True)
class Autoencoder:
    """What `vae_suite` needs of a run that has only stage 1 (no diffusion checkpoint yet):
    the run's config, its VAE (frozen, on `device`) and the file it came from."""

    cfg: Config
    vae: torch.nn.Module
    device: torch.device
    source: Path

    def guidance(self, requested: float | None) -> float:
        """As `Pipeline.guidance`: the report header names the run's sampler settings."""
        return self.cfg.train.sample_guidance if requested is None else requested


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """The VAE of a run folder or a t2i vae.safetensors file, with the config stored in it
    (stage 1 writes the EMA weights there). Raises WeightsError naming the file when it is
    missing, damaged, has no t2i config or does not fit it."""
    from t2i.models.io import read_metadata, require_config
    from t2i.models.vae_files import open_vae, vae_weights_path
    file = vae_weights_path(path)
    cfg = require_config(file, read_metadata(file))
    device = torch.device(device)
    return Autoencoder(cfg=cfg, vae=open_vae(file).to(device), device=device, source=file)


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Decode of the posterior mean, clamped: (B, 3, H, W) in [-1, 1] -> the same shape."""
    return vae.decode(vae.encode(images).mode()).float().clamp(-1, 1)


LPIPS_NOTE = ("LPIPS needs its VGG16 + linear-layer weights, which are never downloaded: pass "
              "--lpips-weights PATH (t2i.models.lpips format, docs/vae.md 'LPIPS weights file')")
RFID_NOTE = ("reconstruction FID needs Inception-v3 weights, which are never downloaded: pass "
             "--inception-weights PATH (torchvision inception_v3 IMAGENET1K_V1 state dict)")


@torch.no_grad()
def reconstruction_metrics(vae: torch.nn.Module, batches: Iterable[torch.Tensor],
                           device: torch.device, features: Features | None = None,
                           lpips: torch.nn.Module | None = None) -> dict[str, Any]:
    """Reconstructions (`reconstruct`) of every image in `batches` ((b, 3, H, W) in [-1, 1])
    against the images: PSNR (mean, min; dB), SSIM (mean), `sharpness` = `sharpness_ratio`
    over the whole set (sums accumulated batch by batch; None for flat images), with an
    `lpips` network (t2i.models.lpips, on `device`) the mean LPIPS distance (Zhang et al. 2018;
    lower = closer; None and `lpips_note` without one) and, with a feature extractor, `rfid`:
    the Frechet distance between the features of the originals and of the reconstructions
    (None and `rfid_note` without one or with fewer than 2 images)."""
    psnrs, ssims, real_f, fake_f, distances = [], [], [], [], []
    energy_recon = energy_real = 0.0
    for x in batches:
        x = x.to(device)  # (b, 3, H, W)
        recon = reconstruct(vae, x)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
        if lpips is not None:
            distances.append(lpips(recon, x).cpu())  # (b,)
        energy_recon += highfreq_energy(recon).sum().item()
        energy_real += highfreq_energy(x).sum().item()
        if features is not None:
            real_f.append(features(x).cpu())  # (b, D)
            fake_f.append(features(recon).cpu())
    p, s = torch.cat(psnrs), torch.cat(ssims)
    out = {"n": len(p), "psnr_db": p.mean().item(), "psnr_db_min": p.min().item(),
           "ssim": s.mean().item(),
           "sharpness": energy_recon / energy_real if energy_real > 0 else None,
           "highfreq_cutoff": HIGHFREQ_CUTOFF,
           "lpips": torch.cat(distances).mean().item() if distances else None, "rfid": None}
    if lpips is None:
        out["lpips_note"] = LPIPS_NOTE
    if features is None:
        out["rfid_note"] = RFID_NOTE
    elif len(p) < 2:
        out["rfid_note"] = "reconstruction FID needs at least 2 images"
    else:
        out["rfid"] = features_frechet_distance(torch.cat(real_f), torch.cat(fake_f))
    return out


@torch.no_grad()
def vae_suite(pipe: Pipeline | Autoencoder, source: str, n: int = 256, batch_size: int = 32,
              seed: int = 12345, features: Features | None = None,
              lpips: torch.nn.Module | None = None) -> dict[str, Any]:
    """`reconstruction_metrics` of `pipe`'s VAE on `n` images from `source` (see
    `real_batches`) at the config's data.resolution: PSNR, SSIM, sharpness ratio, LPIPS with
    `lpips`, rFID with `features`."""
    images = (x for x, _ in real_batches(pipe.cfg, source, n, batch_size, seed))
    report = reconstruction_metrics(pipe.vae, images, pipe.device, features, lpips)
    return {"suite": "vae", "source": source, "resolution": pipe.cfg.data.resolution, **report}


# ----------------------------------------------------------------------------------------------
# Sampler agreement
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sampler_agreement(pipe: Pipeline, prompts: list[str], seed: int = 0, guidance: float = 5.0,
                      compare_steps: int = 50, steps_list: tuple[int, ...] = (10, 25, 50, 100),
                      reference_steps: int = 200) -> dict[str, Any]:
    """Mean |latent difference| between PNDM and LMS at `compare_steps` from the same noise, and
    each sampler's mean |latent difference| to its own `reference_steps` result as steps grow
    (a sampler that converges shows a shrinking distance)."""
    def run(sampler: str, steps: int) -> torch.Tensor:
        return generate(pipe, prompts, sampler=sampler, steps=steps, guidance=guidance,
                        seed=seed, batch_size=len(prompts)).latents  # (N, C, h, w)

    convergence = {}
    for sampler in ("pndm", "lms"):
        ref = run(sampler, reference_steps)
        convergence[sampler] = {str(s): (run(sampler, s) - ref).abs().mean().item()
                                for s in steps_list}
    return {"suite": "agreement", "n": len(prompts), "compare_steps": compare_steps,
            "pndm_vs_lms": (run("pndm", compare_steps) - run("lms", compare_steps)).abs().mean().item(),
            "reference_steps": reference_steps, "distance_to_reference": convergence}


# ----------------------------------------------------------------------------------------------
# FID and CLIP score
# ----------------------------------------------------------------------------------------------


def unusable(weights: str | None) -> str:
    """Why a weights path given cannot be used: "is a folder, not a weights file" or "does not
    exist"; "" when none was given or it is a file."""
    if not weights or Path(weights).is_file():
        return ""
    return "is a folder, not a weights file" if Path(weights).is_dir() else "does not exist"


def _unusable_note(weights: str | None) -> str:
    why = unusable(weights)
    return f"; {weights!r} {why}" if why else ""


def inception_features(weights: str | None, device: str | torch.device = "cpu") -> Features:
    """torchvision's Inception-v3 2048-d pool features from a local state dict. Images are
    resized to 299 bilinearly and fed in [-1, 1], the range the IMAGENET1K_V1 weights expect
    with transform_input off. Not the TF-FID network: numbers are comparable within t2i only."""
    if not weights or not Path(weights).is_file():
        raise MissingWeights(
            f"FID needs Inception-v3 weights, which cannot be downloaded here: pass "
            f"--inception-weights PATH to torchvision's inception_v3 IMAGENET1K_V1 state dict "
            f"(.pth){_unusable_note(weights)}")
    import torchvision
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                            transform_input=False)
    try:
        state = read_state_dict(weights)
    except WeightsError as err:  # its text names torch's internal exception
        raise WeightsError(f"--inception-weights {weights!r} is not a weights file t2i can "
                           f"read (torchvision's inception_v3 state dict: .pth or "
                           f".safetensors)") from err
    load_into(model, state, weights)  # WeightsError naming the file and the mismatched keys
    model.fc = torch.nn.Identity()
    model = model.to(device).eval().requires_grad_(False)

    def features(images: torch.Tensor) -> torch.Tensor:
        # bilinear, no antialias: pytorch-fid's resize, kept so FIDs compare with its numbers
        x = F.interpolate(images.float().to(device), size=(299, 299), mode="bilinear",
                          align_corners=False)  # (B, 3, 299, 299)
        return model(x)  # (B, 2048)

    return features


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Square images (B, 3, H, W) in [-1, 1] -> CLIP's input (B, 3, *size), normalised: resized
    by antialiased bicubic (open_clip's preprocessing resizes PIL images, which antialiases;
    plain bicubic would alias when shrinking 512 px to 224) and clamped to [0, 1] first."""
    mean, std = (torch.tensor(v, device=images.device)[:, None, None]
                 for v in (CLIP_MEAN, CLIP_STD))
    x = F.interpolate((images.float() + 1) / 2, size=size, mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 1)  # (B, 3, S, S)
    return (x - mean) / std


def clip_scorer(weights: str | None, model_name: str = "ViT-B-32",
                device: str | torch.device = "cpu") -> ClipScore:
    """CLIP score (Hessel et al. 2021, the torchmetrics scaling): 100 * max(cos(image, text), 0)
    per pair, with an open_clip model loaded from a local weights file. Square images (B, 3,
    H, W) in [-1, 1] are resized to the model's input by antialiased bicubic, as open_clip's
    preprocessing (PIL) does. The activation is not stored in a weights file: OpenAI's weights
    need the `-quickgelu` model name (ViT-B-32-quickgelu); under ViT-B-32 they load and give
    wrong embeddings. Raises MissingWeights, WeightsError."""
    if not weights or not Path(weights).is_file():
        raise MissingWeights(
            f"CLIP score needs open_clip {model_name} weights, which cannot be downloaded here: "
            f"pass --clip-weights PATH (and --clip-model NAME){_unusable_note(weights)}")
    import open_clip
    if model_name not in open_clip.list_models():
        raise WeightsError(f"--clip-model {model_name!r} is not an open_clip model "
                           f"(e.g. ViT-B-32); see open_clip.list_models()")
    try:  # open_clip reads the file with torch.load(weights_only=True) or safetensors
        model = open_clip.create_model(model_name, pretrained=weights, device=device).eval()
    except Exception as err:  # noqa: BLE001 - torch and open_clip raise anything on a foreign file
        raise WeightsError(f"--clip-weights {weights!r} is not open_clip {model_name} weights "
                           f"t2i can read (another --clip-model's, damaged, or no weights "
                           f"file)") from err
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_pixels(images.to(device), size)  # (B, 3, S, S)
        image_emb = F.normalize(model.encode_image(x), dim=-1)  # (B, E)
        text_emb = F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)
        return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)  # (B,)

    return score


@torch.no_grad()
def fid_suite(pipe: Pipeline, source: str, n: int, features: Features | None,
              clip: ClipScore | None, sampler: str = "pndm", steps: int = 50,
              guidance: float = 5.0, seed: int = 0, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """FID between `n` real images of `source` and `n` images generated for their captions
    (image i with seed `seed + i`), and the CLIP score of generated and real images against
    those captions. A metric whose extractor is None is reported as None. `on_batch(b)`: after
    each batch of b generated and scored images (t2i-eval's progress bar)."""
    real_f, fake_f, fake_c, real_c = [], [], [], []
    offset = 0
    for x, prompts in real_batches(pipe.cfg, source, n, batch_size, seed):
        fake = to_tensor(generate(pipe, prompts, sampler=sampler, steps=steps, guidance=guidance,
                                  seed=seed + offset, batch_size=batch_size).images)
        offset += len(prompts)
        if features is not None:
            real_f.append(features(x).cpu())  # (b, D)
            fake_f.append(features(fake).cpu())
        if clip is not None:
            fake_c.append(clip(fake, prompts).cpu())  # (b,)
            real_c.append(clip(x, prompts).cpu())
        if on_batch is not None:
            on_batch(len(prompts))
    fid = (features_frechet_distance(torch.cat(real_f), torch.cat(fake_f))
           if features is not None else None)
    return {"suite": "fid", "source": source, "n": n, "fid": fid,
            "clip_score": torch.cat(fake_c).mean().item() if clip is not None else None,
            "clip_score_real": torch.cat(real_c).mean().item() if clip is not None else None}
