"""Dense, slow, obvious references for the tests (float64 throughout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def patches_by_loops(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Rows ``ā_{i,t}`` of a Conv2d by explicit loops over output positions: ``(M, T, d_in')``.

    Patch entries are ordered (channel, kernel row, kernel column), matching the weight's
    ``c_out × (c_in·k_h·k_w)`` reshape.
    """
    m, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(m):
        per_sample = []
        for oh in range(out_h):
            for ow in range(out_w):
                patch = xp[
                    i,
                    :,
                    oh * sh : oh * sh + dh * (kh - 1) + 1 : dh,
                    ow * sw : ow * sw + dw * (kw - 1) + 1 : dw,
                ]
                row = patch.reshape(-1)
                if conv.bias is not None:
                    row = torch.cat([row, row.new_ones(1)])
                per_sample.append(row)
        rows.append(torch.stack(per_sample))
    return torch.stack(rows)


def per_sample_output_grads(
    model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor, loss_fn=F.cross_entropy
) -> Tensor:
    """``g_i = ∂ℓ_i/∂s_i`` one sample at a time (ℓ_i the loss of sample i alone), as rows
    ``(M, P, d_out)`` — channels last for Conv2d outputs."""
    outs = []
    for i in range(x.shape[0]):
        captured = {}

        def hook(module, inputs, output):
            output.retain_grad()
            captured["s"] = output

        handle = layer.register_forward_hook(hook)
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        handle.remove()
        loss.backward()
        g = captured["s"].grad[0]
        g = g.flatten(1).T if g.dim() == 3 else g.reshape(-1, g.shape[-1])
        outs.append(g)
        model.zero_grad()
    return torch.stack(outs)


def per_sample_grad_matrices(
    model: nn.Module, layer_name: str, x: Tensor, y: Tensor, loss_fn=F.cross_entropy
) -> Tensor:
    """Per-sample ``∇W̄_i`` ``(M, d_out, d_in')`` of one layer, from ``torch.func``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    w = grads[f"{layer_name}.weight"]
    mat = w.reshape(w.shape[0], w.shape[1], -1)
    bias_key = f"{layer_name}.bias"
    if bias_key in grads:
        mat = torch.cat([mat, grads[bias_key].unsqueeze(-1)], dim=-1)
    return mat


def vec(V: Tensor) -> Tensor:
    """Column-stacking ``vec`` (docs/math.md §1): ``vec(g āᵀ) = ā ⊗ g``."""
    return V.T.reshape(-1)


def unvec(v: Tensor, shape: tuple[int, int]) -> Tensor:
    return v.reshape(shape[1], shape[0]).T


def reference_rows(model: nn.Module, name: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``ā`` (by explicit patch loops) and per-sample ``g`` (one backward per sample)."""
    layer = dict(model.named_modules())[name]
    seen = {}

    def keep_input(module, inputs, output):
        seen["x"] = inputs[0]

    handle = layer.register_forward_hook(keep_input)
    model(x)
    handle.remove()
    if isinstance(layer, nn.Conv2d):
        a = patches_by_loops(seen["x"].detach(), layer)
    else:
        a = torch.cat([seen["x"].detach(), torch.ones(len(x), 1)], 1).unsqueeze(1)
    return a, per_sample_output_grads(model, layer, x, y)


def exact_fisher(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """The empirical Fisher block ``(1/M) Σ_i vec(∇W̄_i) vec(∇W̄_i)ᵀ`` of one layer."""
    per_sample = per_sample_grad_matrices(model, name, x, y)
    vecs = torch.stack([vec(G_i) for G_i in per_sample])
    return vecs.T @ vecs / len(per_sample)


def eigen_corrected_block(inv) -> Tensor:
    """``(Q_A ⊗ Q_G) diag(vec S) (Q_A ⊗ Q_G)ᵀ`` of an eigen-corrected inverse, undamped."""
    K = torch.kron(inv.Q_A, inv.Q_G)
    return K @ torch.diag(vec(inv.S)) @ K.T


def dense_directions(pre, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, ``F̂⁻¹ vec(∇W̄)`` by a dense solve with the block the layer's inverse
    says it inverts (``InverseStrategy.dense`` at the dampings in force), divided by the
    block scale: what ``pre.precondition(grads)`` must return."""
    dampings, scales = pre.damping_policy.in_force(pre.config, pre.layers, False)
    out = {}
    for name, block in pre.layers.items():
        F_hat = block.inverse.dense(block.curvature, dampings[name])
        ref = unvec(torch.linalg.solve(F_hat, vec(grads[name])), grads[name].shape)
        out[name] = ref / scales[name]
    return out
