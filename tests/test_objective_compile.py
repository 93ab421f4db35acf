"""The training objectives trace whole: torch.compile(fullgraph=True) captures the stage-2 and
stage-1 losses without a graph break (a break would fall back to eager pieces and cost the
speed train.compile is for; the first H200 run found such a trace failure in the sampler step),
and the compiled loss and gradients equal eager ones. Backend aot_eager: dynamo capture and
AOTAutograd's joint forward/backward graph, without inductor's slow CPU code generation."""

from __future__ import annotations

import torch

from t2i.config import get_preset
from t2i.models.unet import UNet
from t2i.models.vae import VAE
from t2i.schedulers import NoiseSchedule
from t2i.train.step import DiffusionObjective, VAEObjective

CFG = get_preset("tiny")


def loss_and_grads(objective: torch.nn.Module, fn, *inputs: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in objective.parameters() if p.requires_grad]
    loss = fn(*inputs)  # (B,)
    grads = torch.autograd.grad(loss.mean(), params)
    return loss.detach(), list(grads)


def assert_compiled_equals_eager(objective: torch.nn.Module, *inputs: torch.Tensor) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = loss_and_grads(objective, compiled, *inputs)
    loss_e, grads_e = loss_and_grads(objective, objective, *inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for grad_c, grad_e in zip(grads_c, grads_e):  # every parameter's, each nonzero somewhere
        assert grad_e.any()
        assert (grad_c - grad_e).norm() <= 1e-4 * grad_e.norm()


def test_diffusion_objective_compiles_whole_and_matches_eager():
    """The recipe's stage 2: a frozen tower's states come in precomputed, min-SNR with a
    floor, v-prediction (the branches a trace must take without breaking)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet(CFG.unet)
        for param in unet.parameters():  # the zero-initialised output conv would zero every
            if not param.any():          # gradient below it: give it weights too
                torch.nn.init.normal_(param, std=0.02)
    objective = DiffusionObjective(unet, None, NoiseSchedule.from_config(CFG.schedule),
                                   "v_prediction", snr_gamma=5.0, snr_floor=0.1)
    b, length = 2, CFG.text.context_length
    latents = torch.randn(b, CFG.unet.in_channels, 8, 8, generator=gen)  # (B, C, h, w)
    states = torch.randn(b, length, CFG.unet.context_dim, generator=gen)  # (B, L, D)
    t = torch.tensor([10, 900])
    noise = torch.randn(latents.shape, generator=gen)
    assert_compiled_equals_eager(objective, latents, states, t, noise)


def test_vae_objective_compiles_whole_and_matches_eager():
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = VAE(CFG.vae)
    objective = VAEObjective(vae, "l1", kl_weight=1e-6)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1  # (B, 3, H, W)
    eps = torch.randn(2, CFG.vae.z_channels, 8, 8, generator=gen)
    assert_compiled_equals_eager(objective, images, eps)
