"""The eager reference: the executable specification of dynamic routing.

Loop-simple PyTorch, written from Sabour, Frosst & Hinton (2017), "Dynamic Routing Between
Capsules", and the authors' TensorFlow code (bias on s, leaky routing). Every kernel in
fastcaps is tested against these functions; they are never changed to match a kernel.

It is also the baseline of the benchmarks: it materialises the predictions u_hat
([B, I, J, D]) and lets autograd keep what it needs, as public CapsNet ports do.
"""
import torch

__all__ = ["squash", "dynamic_routing"]


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squash non-linearity, v = |s|^2 / (1 + |s|^2) * s / |s|, along `dim`.

    Computed as the algebraically identical v = s * |s| / (1 + |s|^2), which is finite at
    s = 0 without any epsilon: there v = 0, and the gradient is its true value, 0 (the norm's
    subgradient at 0 is taken as 0, which is what torch.linalg.vector_norm's backward does).
    No epsilon is added anywhere, so values away from 0 are exact.

    |s|^2 would overflow for |s| above ~1.8e19 in float32 (and give inf / inf = NaN), so s is
    first divided by a power of two p near max|s_i| (a constant, not differentiated: the
    expression does not depend on it): with t = s / p, v = t * |t| / (1 / p^2 + |t|^2), where
    |t| <= 2 sqrt(n). Scaling by a power of two is exact, so wherever the plain formula does
    not overflow this gives bitwise the same values; for every finite s it is finite.

    Half-precision inputs are computed in float32 and cast back (|s| of a float16 vector can
    reach 65504 * sqrt(n), whose square overflows float16).
    """
    compute_dtype = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    s_c = s.to(compute_dtype)
    largest = s_c.detach().abs().amax(dim=dim, keepdim=True)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))  # s = 0: any scale gives v = 0
    scale = torch.exp2(torch.floor(torch.log2(largest)))
    t = s_c / scale
    norm = torch.linalg.vector_norm(t, dim=dim, keepdim=True)
    return (t * (norm / (scale.reciprocal().square() + norm * norm))).to(s.dtype)


def _coupling(logits: torch.Tensor, leaky: bool) -> torch.Tensor:
    """Coupling coefficients c = softmax over the output capsules (last dim of logits).

    Leaky routing (authors' code): an extra logit fixed at 0 joins the softmax, takes part of
    each input capsule's mass, and is then dropped, so the c of one input sum to less than 1.
    """
    if not leaky:
        return torch.softmax(logits, dim=-1)
    leak = torch.zeros_like(logits[..., :1])
    return torch.softmax(torch.cat([leak, logits], dim=-1), dim=-1)[..., 1:]


def dynamic_routing(u: torch.Tensor, weight: torch.Tensor, iterations: int = 3, *,
                    bias: torch.Tensor | None = None, prior: torch.Tensor | None = None, leaky: bool = False,
                    detach_routing: bool = False) -> torch.Tensor:
    """Routing-by-agreement between input capsules u and output capsules v.

    Args:
        u: [B, I, K] input capsules (for CapsNet, the squashed primary capsules).
        weight: [I, J, D, K], one transform per (input i, output j): u_hat_ij = W_ij u_i.
        iterations: R >= 1 routing iterations (the paper uses 3).
        bias: optional [J, D], added to s before the squash (the authors' code has one).
        prior: optional [I, J], the initial routing logits b^(0) of every sample (default 0, the
            paper); a learnable prior is trained through them.
        leaky: add a zero logit to the softmax that takes mass and is dropped.
        detach_routing: stop the gradient through the routing iterations but the last: the
            coupling coefficients of the last iteration are treated as constants, so the
            gradient reaches u and W only through the last weighted sum.

    Returns:
        v: [B, J, D], the output capsules of the last iteration.

    Per iteration r: c = softmax_j(b); s_j = sum_i c_ij u_hat_ij (+ bias_j); v_j = squash(s_j);
    and, except after the last one, b_ij += u_hat_ij . v_j. b starts at prior (0 without one), the
    same for every sample. The gradient flows through every iteration (through c and b too,
    hence to the prior) unless detach_routing is set, which also detaches the prior (it then
    gets no gradient).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    # u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k]
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    batch, in_caps, out_caps, _ = u_hat.shape
    logits = torch.zeros(batch, in_caps, out_caps, dtype=u_hat.dtype, device=u_hat.device)
    if prior is not None:
        logits = logits + prior  # b^(0)_bij = prior_ij for every sample b
    for r in range(iterations):
        last = r == iterations - 1
        if last and detach_routing:
            logits = logits.detach()
        c = _coupling(logits, leaky)
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)
        if bias is not None:
            s = s + bias
        v = squash(s)
        if not last:
            logits = logits + (u_hat * v.unsqueeze(1)).sum(dim=-1)
    return v
