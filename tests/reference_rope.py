"""Reference forwards of the RoPE families (timm ``Eva``: EVA-02, DINOv3, RoPE-ViT axial and mixed; transformers
``DINOv3ViTModel``) under the compression rules, one image at a time, for the tests.

The model's own modules give the pieces that compression does not touch: the patch embedding with its prefix
tokens, the rope module's angles of the full grid, norms, MLPs, heads. Everything the rules decide is written
out here: which tokens survive (plain sorting), the fused token, ToMe's matching, each token's rotary angles
(its original patch's; none for prefix and fused tokens; a merged token keeps its destination's), the attention
with the N×N matrix and the rotation of every token's query and key, and the (size-weighted) pooling. Nothing
here calls the library.
"""
import math

import timm
import torch
import transformers as T

from reference_vit import keep_listed, tome_slots

PRUNE_RULES = {  # method: (keep by, fuse by)
    "tk": ("attn", None), "tk_n": ("norm", None), "evit": ("attn", "attn"), "evit_n": ("norm", "norm"),
    "n_wa": ("norm", "attn"), "a_wn": ("attn", "norm"), "low_norm": ("low_norm", None),
}


# --- rotation, attention ---------------------------------------------------------------------------

def rotate(vector, sin, cos, half):
    """One token's (H, D) query or key rotated by its angles (D,) or (H, D): half pairs channel i with i + D/2,
    interleaved pairs 2i with 2i + 1; in each pair (a, b) -> (a·cos - b·sin, b·cos + a·sin)."""
    dim = vector.shape[-1]
    if half:
        first, second = vector[..., :dim // 2], vector[..., dim // 2:]
        paired = torch.cat([-second, first], dim=-1)
    else:
        even, odd = vector[..., 0::2], vector[..., 1::2]
        paired = torch.stack([-odd, even], dim=-1).reshape(vector.shape)
    return vector * cos + paired * sin


def attention(q, k, v, positions, angles, size):
    """q, k, v (H, N, D) after the q/k norms; ``positions``: each token's original patch (None: not rotated);
    ``angles``: (sin, cos, half) with rows (P, D) or (H, P, D), None without rotary embeddings. Returns (output (N, H·D), class-token attention
    averaged over heads, keys before rotation averaged over heads)."""
    keys_before = k.mean(0)
    rotated_q, rotated_k = q.clone(), k.clone()
    sin, cos, half = angles if angles is not None else (None, None, None)
    for i, position in enumerate(positions):
        if position is not None and angles is not None:
            rows = sin[..., position, :], cos[..., position, :]
            rotated_q[:, i] = rotate(q[:, i], *rows, half)
            rotated_k[:, i] = rotate(k[:, i], *rows, half)
    logits = rotated_q @ rotated_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if size is not None:
        logits = logits + torch.log(torch.tensor(size, dtype=q.dtype))[None, None, :]
    weights = logits.softmax(-1)
    out = (weights @ v).transpose(0, 1).reshape(q.shape[1], -1)
    return out, weights[:, 0, :].mean(0), keys_before


# --- the rules, carrying positions ---------------------------------------------------------------------

def prune(method, tokens, cls_attn, positions, k, num_prefix):
    """Keep the prefix and the best-scored tokens; append the fused token (not rotated) for a fusing method."""
    n = tokens.shape[0]
    keep = min(n, max(n - k, 2, num_prefix + 1))
    if keep == n:
        return tokens, positions
    keep_by, fuse_by = PRUNE_RULES[method]
    norms = tokens.norm(dim=-1)
    scores = {"attn": cls_attn, "norm": norms, "low_norm": -norms}[keep_by]
    ranked = sorted(range(num_prefix, n), key=lambda i: -float(scores[i]))
    kept = list(range(num_prefix)) + ranked[:keep - num_prefix]
    dropped = ranked[keep - num_prefix:]
    out, out_positions = [tokens[i] for i in kept], [positions[i] for i in kept]
    if fuse_by is not None:
        if fuse_by == "attn":
            weights = [float(cls_attn[i]) for i in dropped]
        else:
            exps = [math.exp(float(norms[i])) for i in dropped]
            weights = [e / sum(exps) for e in exps]
        out.append(sum(w * tokens[i] for w, i in zip(weights, dropped)))
        out_positions.append(None)
    return torch.stack(out), out_positions


def tome(tokens, keys, size, positions, r, num_prefix):
    """ToMe's bipartite soft matching on ``keys`` (``reference_vit.tome_slots``); a merged token keeps its
    destination's position."""
    tokens, size, slots = tome_slots(tokens, keys, size, r, num_prefix)
    return tokens, size, [positions[i] for i in slots]


def reduce(method, x, cls_attn, keys, size, positions, ids, k, num_prefix, listed):
    """One reduction by the rules: (tokens, sizes, positions, original ids; ids are kept for ``random`` only,
    which keeps the original tokens ``listed`` (the model's draw))."""
    if method == "random":
        x, ids = keep_listed(x, ids, listed)
        return x, [1.0] * x.shape[0], [None if i < num_prefix else i - num_prefix for i in ids], ids
    if method == "tome":
        x, size, positions = tome(x, keys, size, positions, k, num_prefix)
        return x, size, positions, None
    x, positions = prune(method, x, cls_attn, positions, k, num_prefix)
    return x, [1.0] * x.shape[0], positions, None  # a pruned or fused token counts once


def run_blocks(blocks, x, angles_of, method, schedule, num_prefix, reduce_at, prop_attn, kept):
    """The pre-norm blocks (dicts of their parts: ``_eva_block``, ``_hf_block``) with the rules applied;
    ``angles_of(i)``: block i's (sin, cos, half) of the full grid. Returns (tokens, sizes)."""
    size, ids = [1.0] * x.shape[0], list(range(x.shape[0]))
    positions = [None] * num_prefix + list(range(x.shape[0] - num_prefix))
    for index, (block, k) in enumerate(zip(blocks, schedule)):
        use_size = size if (method == "tome" and prop_attn and any(s != 1 for s in size)) else None
        h = block["norm1"](x)
        out, cls_attn, keys = attention(*block["qkv"](h), positions, angles_of(index), use_size)
        x = x + block["ls1"](block["out"](out, h))
        listed = kept[index] if kept else None
        if reduce_at == "attn" and k > 0 and method != "none":
            x, size, positions, ids = reduce(method, x, cls_attn, keys, size, positions, ids, k, num_prefix, listed)
        x = x + block["ls2"](block["mlp"](block["norm2"](x)))
        if reduce_at == "block" and k > 0 and method != "none":
            x, size, positions, ids = reduce(method, x, cls_attn, keys, size, positions, ids, k, num_prefix, listed)
    return x, size


def patch_mean(tokens, size, num_prefix):
    """Average pooling: each token counted once per patch it holds (ToMe's sizes; 1 for any other token)."""
    weights = torch.tensor(size[num_prefix:], dtype=tokens.dtype)[:, None]
    return (tokens[num_prefix:] * weights).sum(0) / weights.sum()


# --- timm Eva --------------------------------------------------------------------------------------

def _heads(x, attn):
    return x.reshape(x.shape[0], attn.num_heads, -1).transpose(0, 1)


def _eva_block(block):
    attn = block.attn

    def qkv(h):
        if attn.qkv is not None:
            bias = attn.qkv.bias
            if getattr(attn, "q_bias", None) is not None:
                bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
            q, k, v = (h @ attn.qkv.weight.T + (0 if bias is None else bias)).chunk(3, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        return attn.q_norm(_heads(q, attn)), attn.k_norm(_heads(k, attn)), _heads(v, attn)

    def out(o, h):
        o = attn.norm(o)
        if attn.gate is not None:
            o = o * torch.sigmoid(attn.gate(h))
        return attn.proj(o)

    scale = lambda gamma: (lambda y: y if gamma is None else gamma * y)  # noqa: E731
    return dict(norm1=block.norm1, norm2=block.norm2, qkv=qkv, out=out, mlp=block.mlp,
                ls1=scale(block.gamma_1), ls2=scale(block.gamma_2))


@torch.no_grad()
def eva_outputs(model, images, method, schedule, reduce_at=None, prop_attn=True, kept=None):
    """What a timm Eva (unpatched) returns under the rules, one image at a time."""
    reduce_at = reduce_at or ("attn" if method == "tome" else "block")
    num_prefix = model.num_prefix_tokens
    blocks = [_eva_block(block) for block in model.blocks]
    outputs = []
    for index, image in enumerate(images):
        x, rope = model._pos_embed(model.patch_embed(image[None]))  # tokens and the full grid's angles
        x = model.norm_pre(x)[0]
        half = bool(model.blocks[0].attn.rotate_half)
        tables = [rope[i] if model.rope_mixed else rope for i in range(len(blocks))]
        # timm gives each block [sin, cos] rows concatenated
        angles_of = lambda i: None if rope is None else (*tables[i].chunk(2, dim=-1), half)  # noqa: E731
        x, size = run_blocks(blocks, x, angles_of, method, schedule, num_prefix, reduce_at, prop_attn,
                             kept[index] if kept else None)
        x = model.norm(x)
        pooled = {"avg": lambda: patch_mean(x, size, num_prefix), "token": lambda: x[0]}[model.global_pool]()
        outputs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outputs)


# --- transformers DINOv3 -----------------------------------------------------------------------------

def _hf_block(layer):
    attn = layer.attention

    def qkv(h):
        return tuple(_heads(proj(h), attn) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    return dict(norm1=layer.norm1, norm2=layer.norm2, qkv=qkv, out=lambda o, h: attn.o_proj(o), mlp=layer.mlp,
                ls1=lambda y: y * layer.layer_scale1.lambda1, ls2=lambda y: y * layer.layer_scale2.lambda1)


@torch.no_grad()
def hf_dinov3_outputs(model, images, method, schedule, reduce_at=None, prop_attn=True, kept=None):
    """The pooled output (the normed class token) of a DINOv3ViTModel (unpatched) under the rules."""
    reduce_at = reduce_at or ("attn" if method == "tome" else "block")
    num_prefix = 1 + model.config.num_register_tokens
    blocks = [_hf_block(layer) for layer in model.model.layer]
    outputs = []
    for index, image in enumerate(images):
        x = model.embeddings(image[None])[0]
        cos, sin = model.rope_embeddings(image[None])  # rows of the full grid, rotate-half pairs
        x, _ = run_blocks(blocks, x, lambda i: (sin, cos, True), method, schedule, num_prefix, reduce_at,
                          prop_attn, kept[index] if kept else None)
        outputs.append(model.norm(x)[0])
    return torch.stack(outputs)


# --- small models of every family (random weights, no downloads) -------------------------------------

DEPTH, IMAGE, PATCH = 4, 32, 8
SMALL = dict(pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=64, depth=DEPTH, num_heads=2,
             num_classes=10)
TIMM_FAMILIES = {  # family: (timm name, overrides)
    "eva02": ("eva02_tiny_patch14_224", {}),
    "eva02_separate": ("eva02_tiny_patch14_224", dict(qkv_fused=False, scale_mlp=True, scale_attn_inner=True,
                                                      global_pool="token")),
    "dinov3": ("vit_small_patch16_dinov3", {}),
    "dinov3_token": ("vit_small_patch16_dinov3_qkvb", dict(global_pool="token")),
    "rope_axial": ("vit_small_patch16_rope_224", {}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(global_pool="avg")),
    "eva_no_rope": ("eva02_tiny_patch14_224", dict(use_rot_pos_emb=False)),  # EVA (-01): absolute positions only
}
HF_FAMILIES = {  # family: config overrides
    "hf_dinov3": dict(num_register_tokens=2),
    "hf_dinov3_gated": dict(num_register_tokens=0, use_gated_mlp=True),
}
FAMILIES = list(TIMM_FAMILIES) + list(HF_FAMILIES)


def num_prefix_of(model):
    if isinstance(model, T.DINOv3ViTModel):
        return 1 + model.config.num_register_tokens
    return model.num_prefix_tokens


def randomise(model):
    """Weights large enough that the methods' outputs differ (unit-variance projections, order-one prefix
    tokens, layer scale in [0.5, 1.5])."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() == 0:  # no register tokens
                continue
            if param.ndim >= 2:
                param.normal_(std=param[0].numel() ** -0.5)
            else:
                param.normal_(std=0.1)
            if any(s in name for s in ("cls_token", "reg_token", "register_tokens", "pos_embed")):
                param.normal_(std=1.0)
            if any(s in name for s in ("gamma_", "lambda1")):
                param.uniform_(0.5, 1.5)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.normal_(mean=1.0, std=0.1)
    return model.eval()


def make_model(family, attn="sdpa", seed=0, **overrides):
    """A small model of ``family`` (32 px images, 8 px patches, 4 blocks) with random weights."""
    torch.manual_seed(seed)
    if family in HF_FAMILIES:
        config = T.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                                   intermediate_size=128, image_size=IMAGE, patch_size=PATCH,
                                   **HF_FAMILIES[family], **overrides)
        return randomise(T.DINOv3ViTModel._from_config(config, attn_implementation=attn))
    name, family_overrides = TIMM_FAMILIES[family]
    return randomise(timm.create_model(name, **{**SMALL, **family_overrides, **overrides}))


def output(model, images):
    out = model(images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def reference_outputs(model, images, method, schedule, reduce_at=None, prop_attn=True, kept=None):
    forward = hf_dinov3_outputs if isinstance(model, T.DINOv3ViTModel) else eva_outputs
    return forward(model, images, method, schedule, reduce_at, prop_attn, kept)
