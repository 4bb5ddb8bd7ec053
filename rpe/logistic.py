"""L2-penalised logistic regression with soft targets: the solvers of the linear value probe.

Hand-written because the targets are probabilities in [0, 1] (TD(0) and TD(lambda) bootstrap values, not only 0/1
labels), which scikit-learn's ``LogisticRegression`` does not accept. Inputs up to :data:`NEWTON_MAX_DIM` wide are
fitted by damped Newton steps (exact, a few steps); wider ones by L-BFGS, since a Newton step factors a
(d+1) x (d+1) Hessian whose cost grows as d^3 (d_model 4096 would be about 360x SmolLM2's 576).
"""

from __future__ import annotations

import torch
from torch import nn

def newton_fit(linear: nn.Linear, x: torch.Tensor, targets: torch.Tensor, l2: float, max_iter: int = 50,
               tol: float = 1e-7) -> int:
    """Minimise mean BCE(linear(x), targets) + l2/2 |W|^2 (bias unpenalised) by damped Newton steps, in place,
    starting from the layer's current weights (``linear``: d -> 1). Soft targets in [0, 1] are allowed. Returns Newton steps taken.

    Each step solves the (d+1) x (d+1) system of the penalised Hessian; a step that does not lower the loss is
    halved until it does, so the iteration is monotone even on separable data with a weak penalty.
    """
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1)], 1)  # (n, d+1); the last column carries the bias
    w = torch.cat([linear.weight.detach().flatten(), linear.bias.detach()]).double()  # (d+1,)
    pen = torch.full((d + 1,), float(l2), dtype=torch.float64)
    pen[-1] = 0.0
    t = targets.double()

    def loss_of(w_: torch.Tensor) -> float:
        z = (xa @ w_.float()).double()
        return float(nn.functional.binary_cross_entropy_with_logits(z, t) + 0.5 * (pen * w_ * w_).sum())

    current, steps = loss_of(w), 0
    for steps in range(1, max_iter + 1):
        z = (xa @ w.float()).double()
        p = torch.sigmoid(z)
        grad = (xa.double().T @ (p - t)) / n + pen * w  # (d+1,)
        h = (xa * (p * (1 - p)).float()[:, None]).T @ xa  # (d+1, d+1)
        hess = h.double() / n + torch.diag(pen) + 1e-10 * torch.eye(d + 1, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-4:
            candidate = w - scale * step
            new = loss_of(candidate)
            if new <= current + 1e-12:
                break
            scale /= 2
        else:
            break
        w, improved = candidate, current - new
        current = new
        if improved < tol * max(1.0, abs(current)):
            break
    with torch.no_grad():
        linear.weight.copy_(w[:-1].float().view(1, d))
        linear.bias.copy_(w[-1:].float())
    return steps


NEWTON_MAX_DIM = 1024
"""Widest input the linear probe fits by Newton steps; wider ones (d_model 1536-4096 of 1.5B-8B models) by L-BFGS:
a Newton step factors a (d+1) x (d+1) Hessian, whose cost grows as d^3."""


def lbfgs_fit(linear: nn.Linear, x: torch.Tensor, targets: torch.Tensor, l2: float, max_iter: int = 200,
              tol: float = 1e-7) -> int:
    """The objective of :func:`newton_fit` minimised by L-BFGS with a strong-Wolfe line search, in place, from the
    layer's current weights: O(n d) per iteration, no d x d system. Returns the objective evaluations used."""
    n, d = x.shape
    w = linear.weight.detach().flatten().double().clone().requires_grad_(True)
    b = linear.bias.detach().double().clone().requires_grad_(True)
    xd, t = x.double(), targets.double()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(xd @ w + b, t) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        linear.weight.copy_(w.detach().float().view(1, d))
        linear.bias.copy_(b.detach().float())
    return calls


def fit_logistic(linear: nn.Linear, x: torch.Tensor, targets: torch.Tensor, l2: float, *, refine: bool = False) -> int:
    """Fit ``linear`` (d -> 1) to ``targets`` (n,) in [0, 1] from ``x`` (n, d), in place, warm-started from its
    weights: :func:`newton_fit` up to :data:`NEWTON_MAX_DIM` inputs, :func:`lbfgs_fit` above. ``refine``: a
    short budget for a warm start that is already close (the TD target iterations)."""
    if x.shape[1] <= NEWTON_MAX_DIM:
        return newton_fit(linear, x, targets, l2, max_iter=10 if refine else 50)
    return lbfgs_fit(linear, x, targets, l2, max_iter=50 if refine else 200)


__all__ = ["NEWTON_MAX_DIM", "fit_logistic", "lbfgs_fit", "newton_fit"]
