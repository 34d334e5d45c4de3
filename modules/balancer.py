"""EnCodec's gradient balancer, as an optional replacement for a plain weighted sum.

Each loss that depends only on the generator output gets its gradient with respect to that
output rescaled so that its share of the total gradient norm is its share of the weights,
whatever the raw scale of the loss. The balancer only builds the gradient to inject at the
output; the engine then runs ONE backward over that gradient and the losses that do not go
through the output only (commitment, pairwise):

    grad = balancer.balanced_grad({'l_t': l_t, 'l_f': l_f, ...}, output)
    torch.autograd.backward([output, rest], [grad, torch.ones_like(rest)])

so that no loss reaches the parameters twice: a separate backward of the raw weighted losses
on top would count the output losses again, at the raw scales the balancer is there to undo.
"""
from __future__ import annotations

import typing as tp

import torch

from utils import distributed

BALANCED_LOSS_NAMES = ('l_t', 'l_f', 'l_g', 'l_feat')


class Balancer:
    """Gradient balancer with bias-corrected EMA norms per loss.

    For each loss k, g_k = d loss_k / d output; its norm (L2 norm per batch item, averaged
    over the batch, as in EnCodec) is tracked with an EMA and the injected gradient is
    `sum_k total_norm * w_k / sum_j w_j * g_k / (epsilon + ema_norm_k)`, where the sum of
    weights runs over the losses of the call. Under torch.distributed the norms are averaged
    over ranks so that every rank keeps the same EMA.

    Args:
        weights (dict): Relative weight per loss name.
        ema_decay (float): Decay of the norm EMA (1.0 = plain running mean).
        total_norm (float): Reference norm of the injected gradient.
        epsilon (float): Added to the EMA norms before dividing.
    """

    def __init__(self, weights: dict[str, float], ema_decay: float = 0.999,
                 total_norm: float = 1.0, epsilon: float = 1e-12):
        if not 0.0 < ema_decay <= 1.0:
            raise ValueError(f"balancer.ema_decay must be in (0, 1], got {ema_decay}")
        if total_norm <= 0:
            raise ValueError(f"balancer.total_norm must be > 0, got {total_norm}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.ema_decay = float(ema_decay)
        self.total_norm = float(total_norm)
        self.epsilon = float(epsilon)
        # Bias-corrected EMA as a ratio of two decayed sums (EnCodec's averager).
        self.norm_sums: dict[str, float] = {}
        self.weight_sums: dict[str, float] = {}

    @classmethod
    def from_config(cls, balancer_cfg: tp.Any, weights: tp.Mapping[str, float]) -> "Balancer":
        """Build from the `balancer` config group (`ema_decay`, `total_norm`) and the loss
        weights (`GeneratorLoss.weights`, from the `losses` group). Whether to use it
        (`balancer.enabled`) is the caller's decision."""
        return cls({name: weights[name] for name in BALANCED_LOSS_NAMES if name in weights},
                   ema_decay=float(balancer_cfg.ema_decay),
                   total_norm=float(balancer_cfg.total_norm))

    def update_norms(self, norms: dict[str, float]) -> dict[str, float]:
        """Fold this step's gradient norms into the EMAs; return the bias-corrected EMAs."""
        for name, norm in norms.items():
            self.norm_sums[name] = self.norm_sums.get(name, 0.0) * self.ema_decay + norm
            self.weight_sums[name] = self.weight_sums.get(name, 0.0) * self.ema_decay + 1.0
        return {name: self.norm_sums[name] / self.weight_sums[name] for name in norms}

    def balanced_grad(self, losses: dict[str, torch.Tensor], output: torch.Tensor,
                      grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Gradient to inject at `output` for the scalar `losses` (all functions of `output`)
        and for the losses whose gradient at `output` is given in `grads` (the training step
        computes the adversarial ones while the discriminator's graph is alive).

        Keeps the graph (retain_graph) so that the caller's single backward can follow.
        """
        given = dict(grads or {})
        unknown = [name for name in (*losses, *given) if name not in self.weights]
        if unknown:
            raise KeyError(f"Balancer has no weight for {unknown} (known: {list(self.weights)})")
        grads = {}
        for name, loss in losses.items():
            if loss.dim() != 0 or not loss.requires_grad:
                raise ValueError(f"Balancer: loss {name!r} must be a scalar that depends on the "
                                 "output (reduce per-item losses with .mean(); leave out losses "
                                 "that are not computed)")
            grads[name], = torch.autograd.grad(loss, [output], retain_graph=True)
        for name, grad in given.items():
            if grad.shape != output.shape:
                raise ValueError(f"Balancer: the gradient of {name!r} has shape "
                                 f"{tuple(grad.shape)}, "
                                 f"the output {tuple(output.shape)}")
            grads[name] = grad
        norms = [grad.flatten(1).norm(dim=1).mean() if grad.dim() > 1 else grad.norm()
                 for grad in grads.values()]
        # One host transfer for all norms (and one all-reduce under DDP, so that every rank
        # keeps the same EMA).
        norm_values = distributed.all_reduce_sum_(torch.stack(norms).detach().float())
        norm_values /= distributed.world_size()
        ema_norms = self.update_norms(dict(zip(grads, norm_values.tolist())))
        weight_total = sum(self.weights[name] for name in grads)
        out = torch.zeros_like(output)
        for name, grad in grads.items():
            scale = self.total_norm * self.weights[name] / weight_total / (
                self.epsilon + ema_norms[name])
            out.add_(grad, alpha=scale)
        return out

    def backward(self, losses: dict[str, torch.Tensor], output: torch.Tensor,
                 rest: torch.Tensor | None = None) -> torch.Tensor:
        """Balanced gradient at `output` plus the plain gradient of the scalar `rest`, in one
        backward pass (`rest` that needs no gradient, e.g. a constant 0, is skipped). Returns the
        injected gradient (for logging its norm)."""
        grad = self.balanced_grad(losses, output)
        if rest is None or not rest.requires_grad:
            torch.autograd.backward([output], [grad])
        else:
            torch.autograd.backward([output, rest], [grad, torch.ones_like(rest)])
        return grad

    def state_dict(self) -> dict[str, tp.Any]:
        """EMA state as plain floats (safe for torch.load(weights_only=True))."""
        return {'norm_sums': dict(self.norm_sums), 'weight_sums': dict(self.weight_sums)}

    def load_state_dict(self, state: dict[str, tp.Any]) -> None:
        self.norm_sums = {str(k): float(v) for k, v in state['norm_sums'].items()}
        self.weight_sums = {str(k): float(v) for k, v in state['weight_sums'].items()}
