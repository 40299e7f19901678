"""QuaRot-style rotation (Ashkboos et al. 2024), fused offline into the weights (SPEC 3.5).

The residual stream x [.., H] becomes x Q, Q a seeded random Hadamard [H, H] (orthogonal).
RMSNorm commutes with Q once its weight w is folded into the linears that read it, so:

    embed        E <- E Q                  readers (qkv, gate_up)    W <- W diag(w) Q
    lm_head      L <- L diag(w_final) Q    writers (o_proj, down)    W <- Q^T W,  b <- b Q
    every RMSNorm weight <- 1

plus an exact head-dim Hadamard Hd on each v head's output and each o_proj input head
(softmax(q k^T) v Hd = (softmax(q k^T) v) Hd, so it cancels inside o_proj). Outlier channels
are spread over all channels, which quantizes far better. No online Hadamard is needed.

The rotated model keeps Q and the original final-norm weight as state (`model.rotation`,
saved as `rotation.matrix` and `rotation.final_norm_weight`): drafters trained on the
unrotated model need both to read its rotated features (`rotate_eagle_head_`,
`rotate_shared_draft_`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from specquant.layers.linear import QLinear
from specquant.models.eagle import Eagle3Head, EagleHead
from specquant.models.llama import DecoderLayer, LlamaModel
from specquant.quant.hadamard import hadamard, random_hadamard

# Undoing diag(w_final) divides by w: beyond this max/min ratio the rotated lm_head has lost
# too much of the small channels for a drafter's logits to be recovered.
MAX_NORM_WEIGHT_RATIO = 1e3
ROW_CHUNK = 4096  # rows rotated at a time (bounds the float64 working copy of embed/lm_head)


# ----------------------------------------------------------------------------- state
class Rotation(nn.Module):
    """The rotation of a model: x_rot = x @ matrix, and the final-norm weight it folded."""

    matrix: torch.Tensor
    final_norm_weight: torch.Tensor

    def __init__(self, matrix: torch.Tensor, final_norm_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)  # [H, H]
        self.register_buffer("final_norm_weight", final_norm_weight)  # [H]

    def orthogonal(self) -> torch.Tensor:
        """Q as float64 [H, H]. A low-precision copy is repaired to the nearest orthogonal
        matrix (Newton-Schulz polar iteration); exactly for Hadamard Q, whose entries all
        round alike. A matrix far from orthogonal is an error."""
        x = self.matrix.double()
        eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        dev = float((x @ x.T - eye).abs().max())
        if dev > 0.05:
            raise ValueError(
                f"rotation.matrix is not orthogonal (max |Q Q^T - I| = {dev:.3g}); the "
                "checkpoint's rotation state is corrupt"
            )
        for _ in range(10):
            if dev < 1e-13:
                break
            x = 1.5 * x - 0.5 * x @ x.T @ x
            dev = float((x @ x.T - eye).abs().max())
        return x


def rotation_fingerprint(rotation: Rotation) -> str:
    """A short id of Q: the hash of its sign pattern, which survives any dtype the matrix is
    stored in (a Hadamard Q's entries are all +-1/sqrt(H)). Heads trained on a rotated model
    record it, so they are never converted a second time nor used with another rotation."""
    import hashlib

    signs = (rotation.orthogonal() > 0).to(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(signs).hexdigest()[:16]


def get_rotation(model: nn.Module) -> Rotation | None:
    """The model's rotation state, or None for an unrotated model."""
    rot = getattr(model, "rotation", None)
    return rot if isinstance(rot, Rotation) else None


def attach_rotation(
    model: LlamaModel, matrix: torch.Tensor, final_norm_weight: torch.Tensor
) -> Rotation:
    """Give `model` its rotation state: `rotate_model_` calls this, and so does a loader on
    a freshly built model before loading its weights (placeholder tensors are fine there:
    only shapes are checked; `Rotation.orthogonal` checks the values when they are used)."""
    h = model.config.hidden_size
    if tuple(matrix.shape) != (h, h):
        raise ValueError(f"rotation.matrix must be [{h}, {h}], got {list(matrix.shape)}")
    if tuple(final_norm_weight.shape) != (h,):
        raise ValueError(
            f"rotation.final_norm_weight must be [{h}], got {list(final_norm_weight.shape)}"
        )
    if get_rotation(model) is not None:
        raise ValueError("the model already holds a rotation")
    like = model.embed_tokens.weight
    rot = Rotation(
        matrix.detach().to(device=like.device, dtype=like.dtype),
        final_norm_weight.detach().to(device=like.device, dtype=like.dtype),
    )
    model.rotation = rot
    return rot


# ----------------------------------------------------------------------------- model
def _rows_times(w: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """w @ right in float64, chunked over rows; returned in w's dtype."""
    out = torch.empty(w.shape[0], right.shape[1], dtype=w.dtype, device=w.device)
    for i in range(0, w.shape[0], ROW_CHUNK):
        out[i : i + ROW_CHUNK] = (w[i : i + ROW_CHUNK].double() @ right).to(w.dtype)
    return out


def require_dense(module: nn.Module, what: str) -> None:
    """Refuse modules whose linears are already quantized (fold into dense weights only)."""
    for name, sub in module.named_modules():
        if isinstance(sub, QLinear) and sub.spec is not None:
            raise ValueError(
                f"{what}: linear {name!r} is already quantized ({sub.spec.name}); rotate or "
                "smooth the dense model first, then quantize"
            )


def _rotate_layer_(layer: DecoderLayer, q: torch.Tensor, hd: torch.Tensor) -> None:
    """One decoder layer: fold its norms, Q on the residual-stream side, Hd on v/o heads."""
    attn, mlp = layer.self_attn, layer.mlp
    for norm, lin in (
        (layer.input_layernorm, attn.qkv_proj),
        (layer.post_attention_layernorm, mlp.gate_up_proj),
    ):
        lin.weight.copy_((lin.weight.double() * norm.weight.double()[None, :]) @ q)
        norm.weight.fill_(1.0)
    d = hd.shape[0]
    n_kv = attn.num_kv_heads
    v_start = attn.split[0] + attn.split[1]
    # v' = v Hd per KV head: rows of head g become Hd^T W_g, its bias b_g Hd
    wv = attn.qkv_proj.weight[v_start:].double().view(n_kv, d, -1)
    attn.qkv_proj.weight[v_start:] = torch.einsum("de,gdk->gek", hd, wv).reshape(n_kv * d, -1)
    if attn.qkv_proj.bias is not None:
        bv = attn.qkv_proj.bias[v_start:].double().view(n_kv, d)
        attn.qkv_proj.bias[v_start:] = (bv @ hd).reshape(-1)
    # o_proj reads every attention head through Hd (columns W_h Hd), writes the stream (Q^T W)
    wo = attn.o_proj.weight.double()
    wo = (wo.view(wo.shape[0], attn.num_heads, d) @ hd).reshape(wo.shape[0], -1)
    attn.o_proj.weight.copy_(q.T @ wo)
    mlp.down_proj.weight.copy_(q.T @ mlp.down_proj.weight.double())
    for writer in (attn.o_proj, mlp.down_proj):
        if writer.bias is not None:
            writer.bias.copy_(writer.bias.double() @ q)


@torch.no_grad()
def rotate_model_(model: LlamaModel, seed: int = 0) -> Rotation:
    """Rotate a dense model in place with a random Hadamard Q (seeded); its logits are
    unchanged. Tied or borrowed embeddings are untied: the model then holds its own rotated
    embedding and lm_head, and `model.config` says so. Returns the rotation state."""
    if get_rotation(model) is not None:
        raise ValueError("the model is already rotated; rotate the original model")
    require_dense(model, "rotate_model_")
    cfg = model.config
    like = model.embed_tokens.weight
    q = random_hadamard(cfg.hidden_size, seed).to(like.device)
    hd = (hadamard(cfg.head_dim) / cfg.head_dim**0.5).to(like.device)
    final_w = model.norm.weight.detach().clone()
    for layer in model.layers:
        _rotate_layer_(layer, q, hd)
    # New parameters rather than in-place writes: the embedding may be tied to lm_head or
    # borrowed from another model (a draft's target), which must not change.
    head_w = model.lm_head.weight.detach()
    scaled = q * final_w.double().to(q.device)[:, None]  # diag(w_final) Q
    model.embed_tokens.weight = nn.Parameter(_rows_times(like.detach(), q), requires_grad=False)
    model.lm_head.weight = nn.Parameter(_rows_times(head_w, scaled), requires_grad=False)
    model.norm.weight.fill_(1.0)
    model.config = dataclasses.replace(cfg, tie_word_embeddings=False, shared_embeddings=False)
    return attach_rotation(model, q, final_w)


def _inverse_norm_weight(w: torch.Tensor) -> torch.Tensor:
    """1 / w in float64, refusing weights too close to zero to divide by (see
    MAX_NORM_WEIGHT_RATIO)."""
    w = w.double()
    small, big = float(w.abs().min()), float(w.abs().max())
    if small * MAX_NORM_WEIGHT_RATIO < big:
        j = int(w.abs().argmin())
        raise ValueError(
            f"the rotated model's final-norm weight has channel {j} = {float(w[j]):.3g} vs "
            f"max {big:.3g} (ratio above {MAX_NORM_WEIGHT_RATIO:g}): its drafter cannot be "
            "converted to share the rotated lm_head; use an unrotated target"
        )
    return 1.0 / w


@torch.no_grad()
def rotate_shared_draft_(draft: LlamaModel, target: LlamaModel) -> Rotation:
    """Make a draft that borrows its target's embedding and lm_head (`shared_embeddings`)
    work after the target was rotated: its layers get the target's Q, so the borrowed E Q
    feeds it correctly, and its own lm_head (a copy of the borrowed rows, possibly an FR-Spec
    subset) becomes L diag(w_draft) Q = L_rot Q^T diag(w_draft / w_target) Q."""
    rot = get_rotation(target)
    if rot is None:
        raise ValueError("rotate_shared_draft_: the target is not rotated")
    if draft.embed_tokens.weight is not target.embed_tokens.weight:
        raise ValueError("rotate_shared_draft_: the draft does not borrow the target's embedding")
    if get_rotation(draft) is not None:
        raise ValueError("rotate_shared_draft_: the draft is already rotated")
    require_dense(draft, "rotate_shared_draft_")
    like = draft.embed_tokens.weight
    q = rot.orthogonal().to(like.device)
    hd = (hadamard(draft.config.head_dim) / draft.config.head_dim**0.5).to(like.device)
    for layer in draft.layers:
        _rotate_layer_(layer, q, hd)
    w_draft = draft.norm.weight.detach().clone()
    ratio = w_draft.double() * _inverse_norm_weight(rot.final_norm_weight).to(w_draft.device)
    fix = (q.T * ratio[None, :]) @ q  # Q^T diag(w_draft / w_target) Q
    draft.lm_head.weight = nn.Parameter(
        _rows_times(draft.lm_head.weight.detach(), fix), requires_grad=False
    )
    draft.norm.weight.fill_(1.0)
    draft.config = dataclasses.replace(draft.config, tie_word_embeddings=False)
    return attach_rotation(draft, q, w_draft)


# ----------------------------------------------------------------------------- EAGLE heads
@torch.no_grad()
def rotate_eagle_head_(head: EagleHead | Eagle3Head, rotation: Rotation) -> None:
    """Let a head trained on the unrotated base draft for the rotated one, sharing its
    (rotated) embedding and lm_head. The base now yields e Q (embeddings), norm(h) Q (final
    features; the original feature is f = norm(h) w) and x Q (residual streams).

    EAGLE-1/2: fc columns absorb the un-rotation, [W_e Q | W_f diag(w) Q]; the head's output
    h (an original-space feature) is mapped by M = diag(1/w) Q to g = h M, which the rotated
    lm_head reads as L h and the next depth's fc reads as feature h (SPEC 3.6 instead keeps
    unrotated copies of embed and lm_head; this needs one H x H map and no copies).
    EAGLE-3: fc reads three residual streams (W_i Q per block); q/k/v read
    input_layernorm(embed) (W_e diag(w_e) Q, norm weight 1) when the base's embedding is used.
    """
    if head.base_rotation_folded:
        raise ValueError("this EAGLE head was already converted for a rotated base")
    require_dense(head, "rotate_eagle_head_")
    like = head.fc.weight
    q = rotation.orthogonal().to(like.device)
    h = q.shape[0]
    w = rotation.final_norm_weight.double().to(like.device)
    if isinstance(head, EagleHead):
        if head.config.hidden_size != h:
            raise ValueError(f"EAGLE head width {head.config.hidden_size} != rotation's {h}")
        fc = head.fc.weight.double()
        head.fc.weight.copy_(torch.cat([fc[:, :h] @ q, (fc[:, h:] * w[None, :]) @ q], dim=1))
        out_map = QLinear(h, h)
        # QLinear computes h @ weight^T, so weight = M^T = Q^T diag(1/w)
        out_map.weight = nn.Parameter(
            (q.T * _inverse_norm_weight(w)[None, :]).to(like.dtype), requires_grad=False
        )
        out_map.prepare()
        head.out_map = out_map
    else:
        fc = head.fc.weight.double()
        if fc.shape[1] != 3 * h:
            raise ValueError(f"EAGLE-3 fc reads width {fc.shape[1]}, rotation is for 3 x {h}")
        head.fc.weight.copy_((fc.view(fc.shape[0], 3, h) @ q).view(fc.shape[0], 3 * h))
        if head.embed_tokens is None:  # the base's rotated embedding feeds input_layernorm
            layer = head.midlayer
            qkv = layer.self_attn.qkv_proj.weight
            w_e = layer.input_layernorm.weight.double()
            qkv[:, :h] = ((qkv[:, :h].double() * w_e[None, :]) @ q).to(qkv.dtype)
            layer.input_layernorm.weight.fill_(1.0)
    head.base_rotation_folded = True
