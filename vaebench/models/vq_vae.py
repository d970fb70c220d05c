"""`vq_vae`: the vector-quantised autoencoder (van den Oord, Vinyals & Kavukcuoglu 2017).

The encoder's K-dim output z_e is cut into K / code_dim vectors of code_dim dims, and each is
replaced by its nearest entry of a learned codebook (codebook_size x code_dim, shared by all
positions): z_q. The decoder sees z_q; gradients pass from z_q to z_e unchanged (straight-through).
Per image (their eq. 3, squared L2 over the whole code):

    loss = -log p(x|z_q) + |sg[z_e] - z_q|^2 + commitment * |z_e - sg[z_q]|^2

With `ema: true` the codebook is not learned by gradient but follows exponential moving averages
of the encoder outputs assigned to each entry (their App. A.1): the first term goes away and the
codebook, its counts and sums are buffers updated in place in training mode (vmappable: a packed
group updates each member's own).

A flat latent (every architecture ends in one vector) stands in for the paper's spatial grid of
codes: K / code_dim codes per image, each one of codebook_size. The model is deterministic and has
no learned prior: no ELBO, no samples; the evaluation scores reconstruction, codebook usage
(perplexity, dead codes) and clustering of the quantised codes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from vaebench.losses import LossTerms, Likelihood, recon_nll
from vaebench.models.families import AutoEncoder, Output, Posterior

EMA_EPSILON = 1e-5  # Laplace smoothing of the EMA counts (as in Sonnet's VectorQuantizerEMA)


class VQVAEOptions(BaseModel):
    """Options of the `vq_vae` family.

    codebook_size: entries of the codebook. code_dim: dims of each entry; latent_dim must be a
        multiple (latent_dim / code_dim codes per image). Both fix shapes: shared by a pack.
    commitment: beta of van den Oord et al., the weight of the commitment term (0.25 there).
    ema: learn the codebook by exponential moving averages instead of its loss term, with `decay`.
    """

    model_config = ConfigDict(extra="forbid")
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("commitment", "decay")

    codebook_size: int = Field(512, ge=2, le=65536)
    code_dim: int = Field(4, ge=1)
    commitment: float = Field(0.25, ge=0.0)
    ema: bool = False
    decay: float = Field(0.99, gt=0.0, lt=1.0)


class VQVAE(AutoEncoder):
    """Deterministic encoder, quantised code, no prior to sample."""

    Options: ClassVar[type[BaseModel]] = VQVAEOptions
    regularised: ClassVar[bool] = True  # its val/kl and train/kl hold the regulariser

    def __init__(self, encoder: nn.Module, decoder: nn.Module, **kwargs) -> None:
        super().__init__(encoder, decoder, **kwargs)
        n, d = self.options.codebook_size, self.options.code_dim
        self.num_codes = n
        init = torch.empty(n, d).uniform_(-1.0 / n, 1.0 / n)  # the authors' reference initialisation
        if self.options.ema:
            self.register_buffer("codebook", init)
            # counts start at 1 with the initial entries as their means: an entry that is never
            # picked keeps its place instead of being divided by a count that decays to 0
            self.register_buffer("ema_count", torch.ones(n))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)

    @classmethod
    def check(cls, latent_dim: int, options: BaseModel) -> None:
        if latent_dim % options.code_dim:
            fits = [d for d in range(1, latent_dim + 1) if latent_dim % d == 0]
            raise ValueError(f"latent_dim {latent_dim} is not a multiple of family_options.vq_vae.code_dim "
                             f"{options.code_dim}; allowed code_dim: {', '.join(map(str, fits))}")

    def quantise(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """The nearest codebook entry of each code_dim-slice of z_e (B, K): indices (B, M) and the
        quantised z_q (B, K), M = K / code_dim."""
        flat = z_e.detach().reshape(-1, self.options.code_dim)  # (B*M, D)
        d2 = (flat.unsqueeze(1) - self.codebook.detach().unsqueeze(0)).pow(2).sum(-1)  # (B*M, N)
        codes = d2.argmin(1)  # (B*M,)
        z_q = self.codebook[codes].reshape(z_e.shape)  # (B, K); carries the codebook's gradient
        return codes.view(z_e.shape[0], -1), z_q

    def encode(self, x: Tensor) -> Posterior:
        """The quantised code as the posterior's `mean` (what is decoded and clustered), with its indices."""
        codes, z_q = self.quantise(self.to_mean(self.encoder(x)))
        return Posterior(z_q, None, codes)

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Output:
        z_e = self.to_mean(self.encoder(x))  # (B, K)
        codes, z_q = self.quantise(z_e)
        if self.options.ema and self.training:
            self._ema_update(z_e.detach(), codes)
        z = z_e + (z_q - z_e).detach()  # straight-through: z_q forward, d/dz_e backward
        return Output(self.decode(z), z, Posterior(z_q, None, codes), extras={"z_e": z_e})

    @torch.no_grad()
    def _ema_update(self, z_e: Tensor, codes: Tensor) -> None:
        """N_i <- decay N_i + (1 - decay) n_i;  m_i <- decay m_i + (1 - decay) sum of the z_e picking i;
        e_i <- m_i / N_i (N Laplace-smoothed). In place, on buffers only."""
        flat = z_e.reshape(-1, self.options.code_dim)  # (B*M, D)
        onehot = (codes.reshape(-1, 1) == torch.arange(self.num_codes, device=codes.device)).to(flat.dtype)
        self.ema_count.mul_(self.decay).add_((1.0 - self.decay) * onehot.sum(0))
        self.ema_sum.mul_(self.decay).add_((1.0 - self.decay) * (onehot.T @ flat))
        total = self.ema_count.sum()
        smoothed = (self.ema_count + EMA_EPSILON) / (total + self.num_codes * EMA_EPSILON) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """recon * recon_scale + kl_coef * (|sg[z_e] - z_q|^2 + commitment |z_e - sg[z_q]|^2) per
        image (no codebook term with EMA updates); `kl` holds that vector-quantisation term."""
        recon = recon_nll(out.logits, x, likelihood, log_sigma)  # (B,)
        z_e, z_q = out.extras["z_e"], out.posterior.mean
        commit = (z_e - z_q.detach()).pow(2).sum(1)  # (B,)
        vq = self.commitment * commit
        if not self.options.ema:
            vq = vq + (z_e.detach() - z_q).pow(2).sum(1)
        return LossTerms(loss=recon * recon_scale + kl_coef * vq, recon=recon, kl=vq)

    def extra_repr(self) -> str:
        o = self.options
        return f"codebook={o.codebook_size}x{o.code_dim}, commitment={o.commitment}, ema={o.ema}"
