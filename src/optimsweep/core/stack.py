"""K models of one architecture trained as one batched model (a fused group of trials).

Each member stays an ordinary `nn.Module` with its own `torch.optim` optimizer and
`torch.optim.lr_scheduler` scheduler, with the member's own hyperparameters. What is shared
is memory: each parameter name has one tensor of shape (K, ...), which one `vmap`ped
`functional_call` reads, and every member's parameter is a view of its slice. A step is then
one batched forward and backward for all K members, and K optimizer steps writing into the
same memory.

Matrices are stored transposed, (K, in, out), because the batched backward produces their
gradients in that layout: stored the other way, each step would copy every gradient. A
member's optimizer therefore steps the contiguous (in, out) slice, not the module's (out, in)
view of it; SGD and Adam are elementwise, so that is the same update.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap


class ModelStack:
    """The members' parameters, stacked; `forward` runs every member on its own batch.
    A stack of one model is that model, unchanged."""

    def __init__(self, models: list[nn.Module]):
        self.fused = len(models) > 1
        if self.fused and any(next(iter(m.buffers()), None) is not None for m in models):
            raise ValueError("models with buffers (e.g. BatchNorm statistics) can't be fused; "
                             "use fuse: 1")
        self.models = list(models)
        self._template = copy.deepcopy(models[0]).to("meta")  # the architecture, no memory
        self._names = [name for name, _ in models[0].named_parameters()]
        self._flipped = {name: p.dim() == 2 for name, p in models[0].named_parameters()}
        # What each member's optimizer steps: for a matrix, a tensor of its own over the
        # (in, out) slice; otherwise the member's parameter itself.
        self._stepped = [[torch.empty(0) if self.fused and self._flipped[name] else p
                          for name, p in m.named_parameters()] for m in self.models]
        self.stacked: dict[str, torch.Tensor] = {}
        if self.fused:
            self._restack()

    def __len__(self) -> int:
        return len(self.models)

    def optimizer_params(self, k: int) -> list[torch.Tensor]:
        """The tensors member k's optimizer updates (the model's parameters, in effect)."""
        return self._stepped[k]

    def flipped(self) -> list[bool]:
        """For each parameter, in order: whether optimizers step it transposed, (in, out)."""
        return [self.fused and self._flipped[name] for name in self._names]

    def _restack(self) -> None:
        """Copy the members' parameters into fresh stacked tensors and point each member's
        tensors at its slice. Every tensor keeps its identity, so an optimizer's state (keyed
        by it) stays valid."""
        params = [dict(m.named_parameters()) for m in self.models]
        for i, name in enumerate(self._names):
            flip = self._flipped[name]
            memory = torch.stack([p[name].detach().t() if flip else p[name].detach()
                                  for p in params])
            for k in range(len(self.models)):
                params[k][name].data = memory[k].t() if flip else memory[k]
                if flip:
                    self._stepped[k][i].data = memory[k]
            self.stacked[name] = memory.detach().requires_grad_()

    def remove(self, keep: list[int]) -> None:
        """Keep the members at positions `keep` (in that order); the others leave the stack
        with their parameters copied out, so they no longer share memory."""
        for k, model in enumerate(self.models):
            if k not in keep:
                release(model)
        self.models = [self.models[k] for k in keep]
        self._stepped = [self._stepped[k] for k in keep]
        if self.fused and self.models:
            self._restack()

    def zero_grad(self) -> None:
        for tensor in self.stacked.values():
            tensor.grad = None
        if not self.fused:  # a fused member's gradients are set by share_grads each step
            for p in self.models[0].parameters():
                p.grad = None

    def share_grads(self) -> None:
        """After backward: hand each member's optimizer its slice of the stacked gradients."""
        for i, tensor in enumerate(self.stacked.values()):
            for k, stepped in enumerate(self._stepped):
                stepped[i].grad = None if tensor.grad is None else tensor.grad[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (K, batch, ...) -> (K, batch, ...); member k sees only x[k]."""
        if not self.fused:
            return self.models[0](x[0]).unsqueeze(0)
        return vmap(self._call)(self._views(), x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, ...), the same for every member -> (K, batch, ...)."""
        if not self.fused:
            return self.models[0](x).unsqueeze(0)
        return vmap(self._call, in_dims=(0, None))(self._views(), x)

    def _views(self) -> dict[str, torch.Tensor]:
        """The stacked parameters in the members' own shapes: (K, out, in) for matrices."""
        return {name: t.transpose(1, 2) if self._flipped[name] else t
                for name, t in self.stacked.items()}

    def _call(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template, params, (x,))

    def train(self, mode: bool = True) -> None:
        for model in self.models:
            model.train(mode)


def release(model: nn.Module) -> None:
    """Give a member's parameters contiguous memory of their own (a view of the stack would
    save the whole stack with its state_dict)."""
    for p in model.parameters():
        if (p.untyped_storage().nbytes() > p.numel() * p.element_size()
                or not p.is_contiguous()):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
