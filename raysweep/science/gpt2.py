"""GPT-2 as a sequence classifier: an `nn.Sequential` of blocks (embeddings, transformer blocks,
a pooling head), like every model here, so EUk/CFk count transformer blocks from the head.

Between blocks the hidden states carry one extra channel, the padding mask, so every block
boundary is one plain tensor (EUk/CFk cache the features there). The Gaussian attack's noise is
added by the embedding block (`TokenEmbedding.noise`); attacks.py explains the noise slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raysweep.base.domains import PosInt, Probability

from .data import IDS, PAD, SHIFT


class TokenEmbedding(nn.Module):
    """ids -> token embeddings (+ the row's Gaussian noise) + positions; padding mask appended."""

    def __init__(self, wte: nn.Parameter, wpe: nn.Parameter, dropout: float, max_len: int, std):
        super().__init__()
        # Bare parameters, not nn.Embedding: EUk's re-init calls every reset_parameters, and
        # nn.Embedding's draws N(0, 1), 50x GPT-2's scale; ours is the only one here.
        self.wte, self.wpe, self.std = wte, wpe, std
        self.drop = nn.Dropout(dropout)
        # noise[s] is added to the token embeddings of rows that carry slot s; slot 0 = clean.
        self.register_buffer("noise", torch.zeros(1, max_len, wte.shape[1]), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.wte, std=self.std)
        nn.init.normal_(self.wpe, std=self.std)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The clean token embeddings (N, T, D): where the Gaussian noise lives."""
        return F.embedding(x & IDS, self.wte)

    def from_tokens(self, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        e = e + self.noise[x[:, 0] >> SHIFT]  # a lookup, no branch: also fine under torch.func
        h = self.drop(e + self.wpe[: x.shape[1]])
        real = ((x & IDS) != PAD).unsqueeze(-1).to(h.dtype)
        return torch.cat([h, real], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_tokens(self.tokens(x), x)


class Block(nn.Module):
    """One GPT-2 transformer block on the hidden channels; the mask channel passes through.

    No attention mask: padding is on the right and attention is causal, so real tokens never
    attend to pads, and the head reads only the last real token.
    """

    def __init__(self, block: nn.Module, std: float, n_layer: int):
        super().__init__()
        self.block, self.std, self.n_layer = block, std, n_layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if len(h) == 0:  # transformers' attention cannot reshape 0 rows; unlearners pass them
            return h
        return torch.cat([self.block(h[..., :-1]), h[..., -1:]], -1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # GPT-2's init: Conv1D weights N(0, std), the two projections into the residual stream
        # scaled by 1/sqrt(2 n_layer), biases 0, LayerNorms 1 and 0. (transformers' Conv1D has
        # no reset_parameters of its own, so EUk's re-init relies on this one.)
        for name, p in self.block.named_parameters():
            if p.dim() == 2:
                scale = math.sqrt(2 * self.n_layer) if name.endswith("c_proj.weight") else 1.0
                p.normal_(0.0, self.std / scale)
            else:
                p.fill_(1.0 if name.startswith("ln_") and name.endswith(".weight") else 0.0)


def last_token(h: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token (the mask channel counts them)."""
    last = (h[..., -1].sum(1).long() - 1).clamp_min(0)
    index = last[:, None, None].expand(-1, 1, h.shape[-1] - 1)
    return h[..., :-1].gather(1, index)[:, 0]


class Head(nn.Module):
    """Final LayerNorm and a linear classifier on the last real token (as GPT-2 classifiers do)."""

    def __init__(self, ln_f: nn.LayerNorm, width: int, num_classes: int):
        super().__init__()
        self.ln_f = ln_f
        self.score = nn.Linear(width, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(self.ln_f(last_token(h)))


class Pool(nn.Module):
    """A `Head` without its classifier: the features it classifies (its `ln_f`, same key)."""

    def __init__(self, head: Head):
        super().__init__()
        self.ln_f = head.ln_f

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln_f(last_token(h))


def gpt2(
    input_shape,
    num_classes,
    *,
    n_layer: PosInt = 24,
    n_embd: PosInt = 1024,
    n_head: PosInt = 16,
    dropout: Probability = 0.1,
    pretrained: str = "",
) -> nn.Sequential:
    """GPT-2 as a sequence classifier: embeddings, n_layer blocks, a head on the last token.

    The defaults are gpt2-medium (355M, the paper's model), initialised as GPT-2 is (no weights
    can be downloaded). `pretrained` names a local Hugging Face GPT-2 folder (config.json +
    model.safetensors) to start from instead; its sizes must match n_layer/n_embd/n_head.
    """
    from transformers import GPT2Config, GPT2Model

    (max_len,) = input_shape
    drops = {"embd_pdrop": dropout, "resid_pdrop": dropout, "attn_pdrop": dropout}
    if pretrained:
        body = GPT2Model.from_pretrained(pretrained, attn_implementation="sdpa", **drops)
        sizes = {k: getattr(body.config, k) for k in ("n_layer", "n_embd", "n_head")}
        if sizes != {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}:
            raise ValueError(f"gpt2: {pretrained} has {sizes}; set the model section to match")
    else:
        config = GPT2Config(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head, attn_implementation="sdpa", **drops
        )
        body = GPT2Model(config)
    if max_len > body.config.n_positions:
        raise ValueError(f"gpt2: max_len={max_len} > {body.config.n_positions} positions")
    std = body.config.initializer_range
    embed = TokenEmbedding(body.wte.weight, body.wpe.weight, dropout, max_len, std)
    blocks = [Block(b, std, n_layer) for b in body.h]
    return nn.Sequential(embed, *blocks, Head(body.ln_f, n_embd, num_classes))


def carry_noise(embedding: TokenEmbedding, noise: torch.Tensor) -> None:
    """Give the embedding block the Gaussian attack's noise, slot i + 1 = noise[i]."""
    clean = torch.zeros_like(noise[:1])
    embedding.noise = torch.cat([clean, noise]).to(embedding.noise)
