"""A PyTorch DDPM++ and train step, for timing against jaxdiff only (torch is not a dependency of the project).

The network is the architecture of :class:`jaxdiff.models.DDPMpp` with its defaults (BigGAN residual blocks
with nearest/average resampling inside the block, rescaled skips, positional time embedding, single-head
attention, no FIR, no progressive input or output), written in the style of yang-song/score_sde_pytorch
(``models/ncsnpp.py``, ``layerspp.py``), so that it has exactly the parameters of the JAX model. The step is the
reference code's: continuous VP loss with the eps-parameterization (sum over dimensions, batch mean),
``clip_grad_norm_``, ``Adam``, then the reference's EMA loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm(c: int) -> nn.GroupNorm:
    groups = max(min(c // 4, 32), 1)
    while c % groups:
        groups -= 1
    return nn.GroupNorm(groups, c, eps=1e-6)


class _Block(nn.Module):
    def __init__(self, cin, cout, temb_dim, dropout, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.norm0, self.conv0 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm1, self.drop, self.conv1 = _group_norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else None

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, temb):
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h) + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        w = torch.softmax(torch.bmm(self.q(h), self.k(h).transpose(1, 2)) / math.sqrt(c), dim=-1)
        h = self.out(torch.bmm(w, self.v(h))).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return (x + h) / math.sqrt(2.0)


class DDPMpp(nn.Module):
    """DDPM++ (BigGAN blocks, rescaled skips, positional embedding), NCHW."""

    def __init__(self, nf, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size=32, channels=3):
        super().__init__()
        self.nf = nf
        temb = 4 * nf
        self.temb0, self.temb1 = nn.Linear(nf, temb), nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(channels, nf, 3, padding=1)
        self.plan, mods = [], nn.ModuleList()

        def add(kind, module):
            self.plan.append((kind, len(mods)))
            mods.append(module)

        chans, c, res = [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                add("block", _Block(c, nf * mult, temb, dropout))
                c = nf * mult
                if res in attn_resolutions:
                    add("attn", _Attn(c))
                self.plan.append(("push", None))
                chans.append(c)
            if level != len(ch_mult) - 1:
                add("block", _Block(c, c, temb, dropout, down=True))
                res //= 2
                self.plan.append(("push", None))
                chans.append(c)
        add("block", _Block(c, c, temb, dropout))
        add("attn", _Attn(c))
        add("block", _Block(c, c, temb, dropout))
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.plan.append(("pop", None))
                add("block", _Block(c + chans.pop(), nf * ch_mult[level], temb, dropout))
                c = nf * ch_mult[level]
            if res in attn_resolutions:
                add("attn", _Attn(c))
            if level != 0:
                add("block", _Block(c, c, temb, dropout, up=True))
                res *= 2
        self.mods = mods
        self.norm_out, self.conv_out = _group_norm(c), nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, x, s):
        half = self.nf // 2
        freqs = torch.exp(-math.log(10_000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
        a = s[:, None] * freqs[None]
        temb = self.temb1(F.silu(self.temb0(torch.cat([torch.sin(a), torch.cos(a)], dim=1))))
        hs, h = [self.conv_in(x)], None
        h = hs[0]
        for kind, i in self.plan:
            if kind == "push":
                hs.append(h)
            elif kind == "pop":
                h = torch.cat([h, hs.pop()], dim=1)
            elif kind == "block":
                h = self.mods[i](h, temb)
            else:
                h = self.mods[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def make_step(model, lr=2e-4, grad_clip=1.0, ema_rate=0.9999, beta_min=0.1, beta_max=20.0, eps=1e-5):
    """``step(x) -> loss``: one optimiser step of the reference code on a batch ``x`` (NCHW)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    params = list(model.parameters())
    shadow = [p.detach().clone() for p in params]

    def step(x):
        model.train()
        t = eps + torch.rand(x.shape[0]) * (1.0 - eps)
        z = torch.randn_like(x)
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha, sigma = torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))
        xt = alpha[:, None, None, None] * x + sigma[:, None, None, None] * z
        loss = torch.mean(torch.sum(torch.square(model(xt, 999.0 * t) - z), dim=(1, 2, 3)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():  # the reference's ExponentialMovingAverage.update
            for s, p in zip(shadow, params, strict=True):
                s.sub_((1.0 - ema_rate) * (s - p))
        return loss

    return step
