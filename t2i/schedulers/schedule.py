"""The training noise schedule: DDPM betas, alpha_bar, forward noising, targets and SNR.

Forward process (Ho et al. 2020, eq. 4): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
with alpha_bar_t = prod_{s <= t} (1 - beta_s). All schedule arithmetic is float64; results are
cast to the dtype of the sample they apply to, never the schedule itself (in fp16/bf16,
1 - alpha_bar near t = 0 would lose most of its digits).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from t2i.config import BETA_SCHEDULES, PREDICTION_TYPES, ScheduleConfig


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), s = 0.008;
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float,
               beta_schedule: str) -> torch.Tensor:
    """(T,) float64 betas for a named schedule. `scaled_linear` is linear in sqrt(beta) (LDM)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def scale_snr(betas: torch.Tensor, scale: float) -> torch.Tensor:
    """Betas whose SNR(t) = alpha_bar / (1 - alpha_bar) is `scale` (c) times that of `betas` at
    every t: alpha_bar' = c ab / (1 - ab + c ab). scale < 1 adds noise everywhere (log SNR +
    log c: the resolution shift of Hoogeboom et al. 2023, sec. 3.1), so more of the schedule
    lies where x_t no longer shows the layout and the model must read it from the text."""
    ab = torch.cumprod(1 - betas, dim=0)  # (T,) float64
    ab = scale * ab / (1 - ab + scale * ab)
    return 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])


def _per_sample(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) float64 -> (B, 1, ..., 1) in like's dtype, broadcastable against like."""
    return coefficient.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """betas and alpha_bar (alphas_cumprod), float64 on the CPU; `prediction_type` is what the
    network predicts (the default for `target` and for the samplers)."""

    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64, alpha_bar_t
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; "
                             f"expected one of {', '.join(PREDICTION_TYPES)}")

    @classmethod
    def create(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
               trained_betas: Sequence[float] | torch.Tensor | None = None,
               prediction_type: str = "epsilon") -> "NoiseSchedule":
        """Build from a named beta schedule, or from explicit `trained_betas` (which then win)."""
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten().cpu()
        else:
            if num_train_timesteps < 2:
                raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
            betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0),
                   prediction_type=prediction_type)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        betas = None
        if cfg.snr_scale != 1.0:
            betas = scale_snr(make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                         cfg.beta_schedule), cfg.snr_scale)
        return cls.create(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                          trained_betas=betas, prediction_type=cfg.prediction_type)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same schedule (still float64) on `device`: move it once, before a training loop,
        so that add_noise / target / snr index it without a host-to-device copy per call."""
        return dataclasses.replace(self, betas=self.betas.to(device), alphas_cumprod=self.alphas_cumprod.to(device))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """(T,) float64 sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of the
        variance-exploding view x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps (Karras et al. 2022)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t, float64 on t's device."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4).
        x0, noise: (B, ...); t: (B,) int64. Coefficients in float64, cast to x0's dtype."""
        alpha_bar = self.alpha_bar(t)  # (B,) float64
        return _per_sample(alpha_bar.sqrt(), x0) * x0 + _per_sample((1 - alpha_bar).sqrt(), x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               prediction_type: str | None = None) -> torch.Tensor:
        """What the network should output: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
        (Salimans & Ho 2022, section 4)."""
        prediction_type = prediction_type or self.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            alpha_bar = self.alpha_bar(t)
            return _per_sample(alpha_bar.sqrt(), x0) * noise - _per_sample((1 - alpha_bar).sqrt(), x0) * x0
        raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                         f"expected one of {', '.join(PREDICTION_TYPES)}")

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32 on t's device (min-SNR weighting,
        Hang et al. 2023)."""
        alpha_bar = self.alpha_bar(t)
        return (alpha_bar / (1 - alpha_bar)).float()
