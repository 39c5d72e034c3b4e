"""Porting a CapsNet to fastcaps (README "Porting a CapsNet to fastcaps"): convert_weight, from_weight,
and each row of the README's table against a small re-implementation of that port's routing.

The port routines below are written from the ports' descriptions (their weight layout, product,
softmax axis, iteration count, squash, logit handling), loop-simple and in float64; they are not
the ports' code. Each keeps the port's weight layout, so the test runs the conversion a user runs.
"""
import einops
import pytest
import torch

import fastcaps
from fastcaps import reference

B, I, J, D, K = 3, 6, 3, 4, 4   # K = D: a K/D transpose would keep every shape


def port_squash(s, dim=-1, eps=0.0):
    """The ports' squash, |s|^2 / (1 + |s|^2) * s / (|s| + eps)."""
    squared = (s * s).sum(dim=dim, keepdim=True)
    return squared / (1 + squared) * s / (squared.sqrt() + eps)


# ---------------------------------------------------------------- ports fastcaps reproduces

def xifengguo(u, weight, routings, eps=1e-8):
    """XifengGuo/CapsNet-Pytorch: W [J, I, D, K], û = W u; logits [B, J, I] from 0, softmax over
    J; `routings` weighted sums, all but the last on û detached; squash with eps on |s|."""
    u_hat = (weight[None] @ u[:, None, :, :, None])[..., 0]              # [B, J, I, D]
    b = torch.zeros(u.shape[0], weight.shape[0], weight.shape[1], dtype=u.dtype)
    for r in range(routings):
        c = torch.softmax(b, dim=1)
        if r == routings - 1:
            v = port_squash((c[..., None] * u_hat).sum(dim=2), eps=eps)
        else:
            v = port_squash((c[..., None] * u_hat.detach()).sum(dim=2), eps=eps)
            b = b + (u_hat.detach() * v[:, :, None, :]).sum(dim=-1)
    return v


def danielhavir(u, weight, num_routing, eps=1e-8):
    """danielhavir/capsule-network: W [1, J, I, D, K], û = W u; num_routing - 1 routing steps on
    û detached, then a last weighted sum on û; softmax over J; squash with eps on |s|."""
    u_hat = (weight @ u[:, None, :, :, None])[..., 0]                    # [B, J, I, D]
    b = torch.zeros(u.shape[0], weight.shape[1], weight.shape[2], 1, dtype=u.dtype)
    for _ in range(num_routing - 1):
        c = torch.softmax(b, dim=1)
        v = port_squash((c * u_hat.detach()).sum(dim=2), eps=eps)
        b = b + u_hat.detach() @ v[..., None]
    c = torch.softmax(b, dim=1)
    return port_squash((c * u_hat).sum(dim=2), eps=eps)


def adambielski(u, weight, b, n_iterations):
    """adambielski/CapsNet-pytorch: W [I, K, J*D], û = uᵀ W; a learnable [I, J] logit b (0 at
    init); one weighted sum from b, then n_iterations times: update, softmax over J, weighted sum."""
    batch, in_caps, out_caps = u.shape[0], b.shape[0], b.shape[1]
    u_hat = (u[:, :, None, :] @ weight).view(batch, in_caps, out_caps, -1)   # [B, I, J, D]
    v = port_squash((torch.softmax(b, dim=1)[..., None] * u_hat).sum(dim=1))
    logits = b.expand(batch, in_caps, out_caps)
    for _ in range(n_iterations):
        logits = logits + (u_hat * v[:, None]).sum(dim=-1)
        v = port_squash((torch.softmax(logits, dim=-1)[..., None] * u_hat).sum(dim=1))
    return v


# ---------------------------------------------------------------- ports it does not (the bugs as flags)

def gram_ai(u, weight, route_logits, iterations, softmax_over="inputs"):
    """gram-ai/capsule-networks: W [J, I, K, D], û = uᵀ W; learnable logits [J, 1, I, 1, 1] (0 at
    init); softmax over dim 2, the INPUT capsules; `iterations` weighted sums."""
    priors = u[None, :, :, None, :] @ weight[:, None]                  # [J, B, I, 1, D]
    logits = route_logits
    for r in range(iterations):
        probs = torch.softmax(logits, dim=2 if softmax_over == "inputs" else 0)
        outputs = port_squash((probs * priors).sum(dim=2, keepdim=True))  # [J, B, 1, 1, D]
        if r != iterations - 1:
            logits = logits + (priors * outputs).sum(dim=-1, keepdim=True)
    return outputs[:, :, 0, 0, :].transpose(0, 1)


def jindongwang(u, weight, iterations=3, softmax_over="inputs", batch_mean=True):
    """jindongwang/Pytorch-CapsuleNet and higgsfield/Capsule-Network-Tutorial: W [1, I, J, D, K],
    û = W u; one logit [1, I, J, 1] for the whole batch, softmax over dim 1 (the INPUT capsules,
    F.softmax's implicit dim for a 4-D tensor), updated by the agreement averaged over the batch."""
    u_hat = weight @ u[:, :, None, :, None]                             # [B, I, J, D, 1]
    b = torch.zeros(1, weight.shape[1], weight.shape[2], 1, dtype=u.dtype)
    for r in range(iterations):
        c = torch.softmax(b, dim=1 if softmax_over == "inputs" else 2)
        v = port_squash((c[..., None] * u_hat).sum(dim=1, keepdim=True), dim=-2)   # [B, 1, J, D, 1]
        if r < iterations - 1:
            agreement = (u_hat * v).sum(dim=-2)                          # [B, I, J, 1]
            b = b + (agreement.mean(dim=0, keepdim=True) if batch_mean else agreement)
    return v[:, 0, :, :, 0]


def cedrickchee(u, weight, num_routing, batch_mean=True):
    """cedrickchee/capsule-net-pytorch (current): W [1, I, J, D, K], û = W u; softmax over J
    (dim 2); one logit [1, I, J, 1] for the batch, updated (after every iteration) by the
    agreement averaged over the batch; squash over D."""
    u_hat = weight @ u[:, :, None, :, None]                             # [B, I, J, D, 1]
    b = torch.zeros(1, weight.shape[1], weight.shape[2], 1, dtype=u.dtype)
    for _ in range(num_routing):
        c = torch.softmax(b, dim=2)
        v = port_squash((c[..., None] * u_hat).sum(dim=1, keepdim=True), dim=3)
        agreement = (u_hat * v).sum(dim=3)
        b = b + (agreement.mean(dim=0, keepdim=True) if batch_mean else agreement)
    return v[:, 0, :, :, 0]


# ---------------------------------------------------------------- helpers

def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = fastcaps.squash(torch.randn(B, I, K, generator=gen, dtype=torch.float64))
    weight = torch.randn(I, J, D, K, generator=gen, dtype=torch.float64)   # fastcaps layout, the truth
    grad = torch.randn(B, J, D, generator=gen, dtype=torch.float64)
    return u, weight, grad


def _port_layout(weight, port):
    """fastcaps' weight stored as the port stores it."""
    return {"j i d k": weight.permute(1, 0, 2, 3),
            "1 j i d k": weight.permute(1, 0, 2, 3)[None],
            "i k (j d)": weight.permute(0, 3, 1, 2).reshape(I, K, J * D),
            "j i k d": weight.permute(1, 0, 3, 2),
            "1 i j d k": weight[None]}[port].contiguous()


def _v_and_grads(fn, u, weight, grad, *extra):
    leaves = [t.detach().clone().requires_grad_() for t in (u, weight) + extra]
    v = fn(*leaves)
    return (v.detach(),) + torch.autograd.grad(v, leaves, grad)


def _close(actual, expected, tol):
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# (port routine, its layout, product, fastcaps iterations for the port's count, fastcaps options,
#  whether the port learns prior logits [I, J])
REPRODUCED = {
    "XifengGuo/CapsNet-Pytorch": (lambda u, w: xifengguo(u, w, 3, eps=0.0), "j i d k", "Wu", 3,
                                  {"detach_routing": True}, False),
    "danielhavir/capsule-network": (lambda u, w: danielhavir(u, w, 3, eps=0.0), "1 j i d k", "Wu", 3,
                                    {"detach_routing": True}, False),
    # n_iterations=3 counts logit updates: 4 weighted sums; its trained b is fastcaps' prior
    "adambielski/CapsNet-pytorch": (lambda u, w, b: adambielski(u, w, b, 3), "i k (j d)", "uW", 4, {}, True),
}


@pytest.mark.parametrize("port", list(REPRODUCED))
@pytest.mark.parametrize("routing", ["reference", "fused"])
def test_port_matches_fastcaps_after_conversion(port, routing):
    """v, du and dW (and d prior) of the port equal fastcaps' on the converted weight, to float64
    rounding (the fused op under the interpreter on the CPU)."""
    fn, pattern, product, iterations, options, learns_prior = REPRODUCED[port]
    u, weight, grad = _inputs()
    port_weight = _port_layout(weight, pattern)
    prior = (torch.randn(I, J, generator=torch.Generator().manual_seed(7), dtype=torch.float64),) if learns_prior else ()
    v, du, dw_port, *d_prior = _v_and_grads(fn, u, port_weight, grad, *prior)
    converted = fastcaps.convert_weight(port_weight, pattern, product, d=D)
    assert torch.equal(converted, weight)
    op = reference.dynamic_routing if routing == "reference" else fastcaps.dynamic_routing
    assert routing == "reference" or fastcaps.kernels_available(u.device)  # the kernels, not the fallback
    v_f, du_f, dw_f, *d_prior_f = _v_and_grads(
        lambda u_, w_, *p: op(u_, w_, iterations, prior=p[0] if p else None, **options), u, converted, grad, *prior)
    tol = 1e-12 if routing == "reference" else 1e-10
    _close(v_f, v, tol)
    _close(du_f, du, tol)
    _close(dw_f, fastcaps.convert_weight(dw_port, pattern, product, d=D), tol)  # dW converts like W
    for got, want in zip(d_prior_f, d_prior):
        _close(got, want, tol)


@pytest.mark.parametrize("n_iterations", [0, 1, 3])
def test_port_counting_logit_updates_is_iterations_plus_one(n_iterations):
    """adambielski's n_iterations counts logit updates: it is fastcaps iterations=n+1, not n."""
    u, weight, _ = _inputs(1)
    port_weight = _port_layout(weight, "i k (j d)")
    v = adambielski(u, port_weight, torch.zeros(I, J, dtype=u.dtype), n_iterations)
    converted = fastcaps.convert_weight(port_weight, "i k (j d)", "uW", j=J)
    _close(reference.dynamic_routing(u, converted, n_iterations + 1), v, 1e-12)
    if n_iterations:
        off_by_one = reference.dynamic_routing(u, converted, n_iterations)
        assert (off_by_one - v).norm() / v.norm() > 1e-3


@pytest.mark.parametrize("port", ["XifengGuo/CapsNet-Pytorch", "danielhavir/capsule-network"])
def test_squash_epsilon_is_a_tiny_difference(port):
    """The ports' squash adds 1e-8 to |s|: v differs by ~1e-8 relative, not to float64 rounding."""
    u, weight, _ = _inputs(2)
    pattern = REPRODUCED[port][1]
    routine = xifengguo if port.startswith("Xifeng") else danielhavir
    v = routine(u, _port_layout(weight, pattern), 3, eps=1e-8)
    v_fastcaps = reference.dynamic_routing(u, weight, 3, detach_routing=True)
    err = ((v - v_fastcaps).norm() / v_fastcaps.norm()).item()
    assert 1e-12 < err < 1e-6


def _predictions(u, weight):
    return torch.einsum("ijdk,bik->bijd", weight, u)


def test_gram_ai_conversion_and_the_softmax_over_the_inputs():
    """gram-ai/capsule-networks: the conversion gives its predictions exactly; its softmax over the
    input capsules is not what fastcaps computes (v differs), and with the softmax over the outputs
    its routing is fastcaps' with its learnt route_logits as the prior."""
    u, weight, _ = _inputs(3)
    port_weight = _port_layout(weight, "j i k d")
    converted = fastcaps.convert_weight(port_weight, "j i k d", "uW")
    port_u_hat = (u[None, :, :, None, :] @ port_weight[:, None])[:, :, :, 0, :].permute(1, 2, 0, 3)
    torch.testing.assert_close(_predictions(u, converted), port_u_hat, rtol=1e-13, atol=0)
    logits = torch.randn(J, 1, I, 1, 1, dtype=u.dtype, generator=torch.Generator().manual_seed(8))  # trained
    prior = einops.rearrange(logits, "j 1 i 1 1 -> i j")
    v_fastcaps = reference.dynamic_routing(u, converted, 3, prior=prior)
    assert (gram_ai(u, port_weight, logits, 3) - v_fastcaps).norm() / v_fastcaps.norm() > 1e-2
    _close(gram_ai(u, port_weight, logits, 3, softmax_over="outputs"), v_fastcaps, 1e-12)


@pytest.mark.parametrize("softmax_over, batch_mean", [("inputs", True), ("outputs", True), ("inputs", False)])
def test_jindongwang_softmax_over_inputs_and_batch_averaged_logits(softmax_over, batch_mean):
    """jindongwang/Pytorch-CapsuleNet, higgsfield/Capsule-Network-Tutorial: each of its two bugs
    alone changes v; without both its routing is fastcaps'."""
    u, weight, _ = _inputs(4)
    port_weight = _port_layout(weight, "1 i j d k")
    converted = fastcaps.convert_weight(port_weight, "1 i j d k", "Wu")
    v_fastcaps = reference.dynamic_routing(u, converted, 3)
    _close(jindongwang(u, port_weight, 3, softmax_over="outputs", batch_mean=False), v_fastcaps, 1e-12)
    v = jindongwang(u, port_weight, 3, softmax_over=softmax_over, batch_mean=batch_mean)
    assert (v - v_fastcaps).norm() / v_fastcaps.norm() > 1e-3


def test_cedrickchee_batch_averaged_logits():
    """cedrickchee/capsule-net-pytorch: logits averaged over the batch make each sample's output
    depend on the others; for a batch of one (the mean is the sample) it is fastcaps' routing."""
    u, weight, _ = _inputs(5)
    port_weight = _port_layout(weight, "1 i j d k")
    converted = fastcaps.convert_weight(port_weight, "1 i j d k", "Wu")
    v_fastcaps = reference.dynamic_routing(u, converted, 3)
    _close(cedrickchee(u[:1], port_weight, 3), v_fastcaps[:1], 1e-12)
    _close(cedrickchee(u, port_weight, 3, batch_mean=False), v_fastcaps, 1e-12)
    v = cedrickchee(u, port_weight, 3)
    assert (v - v_fastcaps).norm() / v_fastcaps.norm() > 1e-3


# ---------------------------------------------------------------- convert_weight and from_weight

def test_convert_weight_every_layout_of_the_table():
    _, weight, _ = _inputs()
    for pattern, product in (("j i d k", "Wu"), ("1 j i d k", "Wu"), ("i k (j d)", "uW"), ("j i k d", "uW"),
                             ("1 i j d k", "Wu"), ("i j d k", "Wu")):
        converted = fastcaps.convert_weight(_port_layout(weight, pattern) if pattern != "i j d k" else weight,
                                            pattern, product, d=D)
        assert converted.is_contiguous() and torch.equal(converted, weight), pattern


def test_a_reshape_without_its_permute_is_impossible():
    """[I, K, J*D] (adambielski) reshaped to [I, J, D, K] keeps every size but scrambles W; the API
    has no reshape-only mode: the pattern names every axis, and a pattern of the wrong rank fails."""
    u, weight, _ = _inputs()
    port_weight = _port_layout(weight, "i k (j d)")
    wrong = port_weight.reshape(I, J, D, K)
    assert not torch.allclose(reference.dynamic_routing(u, wrong), reference.dynamic_routing(u, weight))
    torch.testing.assert_close(fastcaps.convert_weight(port_weight, "i k (j d)", "uW", j=J), weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pattern 'i j d k' has 4 dims but the weight has 3"):
        fastcaps.convert_weight(port_weight, "i j d k", "Wu")
    with pytest.raises(ValueError, match=r"axis d .* is dim 1 .* of size 4, but d=5 was given"):
        fastcaps.convert_weight(port_weight, "i d (j k)", "Wu", d=5)


def test_a_k_d_transpose_is_impossible_when_k_equals_d():
    """With K = D the shapes cannot tell a [D, K] matrix from a [K, D] one; the product the port
    computes must agree with the pattern's order of d and k."""
    _, weight, _ = _inputs()
    port_weight = _port_layout(weight, "j i k d")          # gram-ai: u @ W, a [K, D] matrix
    with pytest.raises(ValueError, match=r"'j i d k' puts d before k, but product='uW'"):
        fastcaps.convert_weight(port_weight, "j i d k", "uW")
    with pytest.raises(ValueError, match=r"'j i k d' puts k before d, but product='Wu'"):
        fastcaps.convert_weight(port_weight, "j i k d", "Wu")
    assert torch.equal(fastcaps.convert_weight(port_weight, "j i k d", "uW"), weight)


@pytest.mark.parametrize("pattern, product, sizes, shape, match", [
    ("i j d", "Wu", {}, (I, J, D), r"axis k \(input capsule dim K, in_dim\) appears 0 times"),
    ("i j j d k", "Wu", {}, (I, J, J, D, K), r"axis j .* appears 2 times"),
    ("i j x d k", "Wu", {}, (I, J, 1, D, K), r"unknown axis 'x'"),
    ("i j (d k", "Wu", {}, (I, J, D * K), r"'\(' is not closed"),
    ("i j ((d) k)", "Wu", {}, (I, J, D * K), r"nested parentheses"),
    ("1 i j d k", "Wu", {}, (2, I, J, D, K), r"dim 0 of the weight \(2, 6, 3, 4, 4\) is the '1', but has size 2"),
    ("i k (j d)", "uW", {}, (I, K, J * D), r"groups \(j d\); give the size of all but one of j, d"),
    ("i k (j d)", "uW", {"d": 5}, (I, K, J * D), r"groups \(j d\), which does not match the sizes given: d=5"),
    ("i k (j d)", "uW", {"j": 3, "d": 5}, (I, K, J * D), r"does not match the sizes given: j=3, d=5"),
    ("i j d k", "Wu", {"i": 7}, (I, J, D, K), r"axis i \(input capsules I, in_caps\) is dim 0 .* but i=7"),
    ("i j d k", "wu", {}, (I, J, D, K), r"product must be 'Wu'"),
    ("i j d k", "Wu", {"j": 0}, (I, J, D, K), r"j .* must be an int >= 1, got 0"),
])
def test_convert_weight_names_what_disagrees(pattern, product, sizes, shape, match):
    with pytest.raises(ValueError, match=match):
        fastcaps.convert_weight(torch.zeros(shape), pattern, product, **sizes)


def test_convert_weight_rejects_a_non_tensor():
    with pytest.raises(TypeError, match="weight must be a tensor"):
        fastcaps.convert_weight([[1.0]], "i j d k", "Wu")
    with pytest.raises(TypeError, match="pattern must be a string"):
        fastcaps.convert_weight(torch.zeros(1, 1, 1, 1), ["i", "j", "d", "k"], "Wu")


@pytest.mark.parametrize("cls", [fastcaps.DigitCaps, fastcaps.FusedDigitCaps])
def test_from_weight_builds_the_layer(cls):
    u, weight, _ = _inputs()
    port_weight = _port_layout(weight, "i k (j d)")
    layer = cls.from_weight(port_weight, "i k (j d)", "uW", 4, out_caps=J, in_caps=I, bias=True, leaky=True)
    assert type(layer) is cls
    assert (layer.in_caps, layer.in_dim, layer.out_caps, layer.out_dim, layer.iterations) == (I, K, J, D, 4)
    assert layer.leaky and layer.bias.shape == (J, D) and layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, weight)
    expected = reference.dynamic_routing(u, weight, 4, bias=layer.bias, leaky=True)
    _close(layer(u).detach(), expected.detach(), 1e-10)
    assert cls.from_weight(port_weight, "i k (j d)", "uW", out_dim=D, prior=True).prior.shape == (I, J)
    with pytest.raises(ValueError, match=r"axis i \(input capsules I, in_caps\) is dim 0 .* of size 6, but i=5"):
        cls.from_weight(port_weight, "i k (j d)", "uW", in_caps=5, out_dim=D)
    with pytest.raises(ValueError, match=r"groups \(j d\), which does not match the sizes given: d=5"):
        cls.from_weight(port_weight, "i k (j d)", "uW", out_dim=5)


def test_from_weight_loads_a_port_state_dict_into_capsnet():
    """The state_dict route: a port's weight converted into a CapsNet's digit capsules."""
    net = fastcaps.CapsNet(routing="eager", input_size=17)       # grid 1: 32 input capsules of 8
    port_weight = torch.randn(10, 32, 8, 16)                      # gram-ai's [J, I, K, D]
    with torch.no_grad():
        net.digit_caps.weight.copy_(fastcaps.convert_weight(port_weight, "j i k d", "uW", i=32, j=10, d=16, k=8))
    u = fastcaps.squash(torch.randn(2, 32, 8))
    expected = torch.einsum("bik,jikd->bijd", u, port_weight)
    torch.testing.assert_close(_predictions(u, net.digit_caps.weight.detach()), expected)


# the second table of the README: the ports whose bugs fastcaps does not copy, with their layouts
NOT_REPRODUCED = {"gram-ai/capsule-networks": ("j i k d", "uW"),
                  "jindongwang/Pytorch-CapsuleNet": ("1 i j d k", "Wu"),
                  "higgsfield/Capsule-Network-Tutorial": ("1 i j d k", "Wu"),
                  "cedrickchee/capsule-net-pytorch": ("1 i j d k", "Wu")}


def _readme_porting_rows():
    """(repository, pattern, product) of every row of README "Porting a CapsNet to fastcaps"."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Porting a CapsNet to fastcaps", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        found = re.search(r'convert_weight\(w, "([^"]+)", "(Wu|uW)"', line)
        if line.startswith("| ") and found:
            for repo in line.split("|")[1].split(","):
                rows.append((repo.strip(), found.group(1), found.group(2)))
    return rows


def test_readme_porting_tables_are_the_tested_conversions():
    """Every row of the README's two tables is a port tested above, with the tested layout."""
    rows = _readme_porting_rows()
    tested = {port: (entry[1], entry[2]) for port, entry in REPRODUCED.items()} | NOT_REPRODUCED
    assert sorted(repo for repo, _, _ in rows) == sorted(tested)
    for repo, pattern, product in rows:
        assert tested[repo] == (pattern, product), repo
