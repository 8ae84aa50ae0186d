"""Straightforward reference implementations of the compression rules, for the tests.

One sample at a time, the attention matrix materialised, indices chosen with plain Python sorting:
slow and obvious, so that the library's batched, fused code can be checked against the rules.
"""
import math

import torch


def attention(block, x, size=None):
    """Returns (output, class-token attention averaged over heads, keys averaged over heads) for one sample (N, C).

    timm's optional parts are read from the block as timm builds them: q/k norms (identity unless qk_norm), a
    norm of the attention output (identity unless scale_attn_norm) and a sigmoid gate (None unless gated)."""
    attn = block.attn
    n, _ = x.shape
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if size is not None:
        logits = logits + torch.log(torch.tensor(size, dtype=x.dtype))[None, None, :]
    weights = logits.softmax(-1)
    out = attn.norm((weights @ v).transpose(0, 1).reshape(n, -1))
    if attn.gate is not None:
        out = out * torch.sigmoid(attn.gate(x))
    return attn.proj(out), weights[:, 0, :].mean(0), k.mean(0)


def prune(tokens, scores, fuse_weights_of, k, num_prefix):
    """Keep the prefix and the best-scored tokens, max(n - k, 2) in all; optionally fuse the rest."""
    n = tokens.shape[0]
    keep = min(n, max(n - k, 2, num_prefix + 1))
    if keep == n:
        return tokens
    candidates = sorted(range(num_prefix, n), key=lambda i: -float(scores[i]))
    kept = list(range(num_prefix)) + candidates[: keep - num_prefix]
    dropped = candidates[keep - num_prefix:]
    out = [tokens[i] for i in kept]
    if fuse_weights_of is not None:
        weights = fuse_weights_of(dropped)
        out.append(sum(w * tokens[i] for w, i in zip(weights, dropped)))
    return torch.stack(out)


def tome_slots(tokens, keys, size, r, num_prefix):
    """ToMe's bipartite soft matching, written out: returns merged tokens, sizes and, for each output slot,
    the input token it is (a merged slot: its B token, the destination).

    Output order: prefix tokens, the unmerged A (even-position) tokens, then the B (odd) tokens.
    """
    n = tokens.shape[0]
    r = min(r, (n - num_prefix) // 2)
    if r <= 0:
        return tokens, size, list(range(n))
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best = {}
    for a in a_pos:
        if a < num_prefix:
            continue
        sims = [(float(unit[a] @ unit[b]), b) for b in b_pos if b >= num_prefix]
        best[a] = max(sims)
    merged_a = sorted(best, key=lambda a: -best[a][0])[:r]
    out_x = {b: tokens[b] * size[b] for b in b_pos}
    out_size = {b: size[b] for b in b_pos}
    for a in merged_a:
        b = best[a][1]
        out_x[b] = out_x[b] + tokens[a] * size[a]
        out_size[b] = out_size[b] + size[a]
    prefix = list(range(num_prefix))  # unchanged, and kept in front
    unmerged = [a for a in a_pos if a not in merged_a and a >= num_prefix]
    b_pos = [b for b in b_pos if b >= num_prefix]
    new_tokens = [tokens[i] for i in prefix + unmerged] + [out_x[b] / out_size[b] for b in b_pos]
    new_size = [size[i] for i in prefix + unmerged] + [out_size[b] for b in b_pos]
    return torch.stack(new_tokens), new_size, prefix + unmerged + b_pos


def tome_merge(tokens, keys, size, r, num_prefix):
    """``tome_slots`` without the slots: merged tokens and sizes."""
    return tome_slots(tokens, keys, size, r, num_prefix)[:2]


def keep_listed(tokens, ids, listed):
    """Keep the tokens whose original indices are ``listed``, in that order (the rule of ``random`` once its
    draw is known): returns (tokens, their original indices)."""
    position = {token_id: i for i, token_id in enumerate(ids)}
    return torch.stack([tokens[position[token_id]] for token_id in listed]), list(listed)


def kept_ids(block_sources):
    """Per image, per block, the original index of each token leaving that block, read from source maps
    ((B, N, N0) 0/1 tensors, one per block) of a pruning method that fuses nothing (one patch per token)."""
    return [[[int(row.argmax()) for row in source[image]] for source in block_sources]
            for image in range(block_sources[0].shape[0])]


def reduce_step(method, tokens, cls_attn, keys, size, ids, k, num_prefix, listed=None):
    """One reduction by the rules, tracking each token's original index (``ids``): returns (tokens, size, ids).
    ``random`` keeps the original indices ``listed`` (its draw, taken from the model under test)."""
    if method == "random":
        tokens, ids = keep_listed(tokens, ids, listed)
        return tokens, size, ids
    tokens, size = reduce(method, tokens, cls_attn, keys, size, k, num_prefix)
    return tokens, size, None


def reduce(method, tokens, cls_attn, keys, size, k, num_prefix):
    if method == "tome":
        return tome_merge(tokens, keys, size, k, num_prefix)
    keep_by, fuse_by = {
        "tk": ("attn", None), "tk_n": ("norm", None), "evit": ("attn", "attn"),
        "evit_n": ("norm", "norm"), "n_wa": ("norm", "attn"), "a_wn": ("attn", "norm"),
        "low_norm": ("low_norm", None),
    }[method]
    norms = tokens.norm(dim=-1)
    scores = {"attn": cls_attn, "norm": norms, "low_norm": -norms}[keep_by]
    fuse = None
    if fuse_by == "attn":
        fuse = lambda dropped: [cls_attn[i] for i in dropped]  # noqa: E731
    elif fuse_by == "norm":
        def fuse(dropped):
            exps = [math.exp(float(norms[i])) for i in dropped]
            return [e / sum(exps) for e in exps]
    return prune(tokens, scores, fuse, k, num_prefix), size


@torch.no_grad()
def reference_logits(model, images, method, schedule, reduce_at=None, prop_attn=True, kept=None):
    """Logits of ``model`` (unpatched) under the compression rules, one image at a time. ``random`` needs
    ``kept``: per image, per block, the original indices of the tokens that block keeps (in order)."""
    reduce_at = reduce_at or ("attn" if method == "tome" else "block")
    num_prefix = model.num_prefix_tokens
    outputs = []
    for index, image in enumerate(images):
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
        size, ids = [1.0] * x.shape[0], list(range(x.shape[0]))
        for block_index, (block, k) in enumerate(zip(model.blocks, schedule)):
            use_size = size if (method == "tome" and prop_attn and any(s != 1 for s in size)) else None
            out, cls_attn, keys = attention(block, block.norm1(x), use_size)
            x = x + block.ls1(out)
            listed = kept[index][block_index] if kept else None
            if reduce_at == "attn" and k > 0 and method != "none":
                x, size, ids = reduce_step(method, x, cls_attn, keys, size, ids, k, num_prefix, listed)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if reduce_at == "block" and k > 0 and method != "none":
                x, size, ids = reduce_step(method, x, cls_attn, keys, size, ids, k, num_prefix, listed)
        pool_size = size if (method == "tome" and prop_attn) else None
        outputs.append(_head(model, model.norm(x[None])[0], pool_size))
    return torch.stack(outputs)


def _head(model, x, size):
    """timm's head on one image's tokens; a MAP head (``attn_pool``) written out, with ToMe's log sizes added to
    its logits when ``size`` is given (the pool weighs merged tokens as the blocks do)."""
    pool = getattr(model, "attn_pool", None)
    if pool is None or size is None:
        return model.forward_head(x[None])[0]
    if not model.pool_include_prefix:
        x, size = x[model.num_prefix_tokens:], size[model.num_prefix_tokens:]
    heads, head_dim = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent[0]).reshape(-1, heads, head_dim).transpose(0, 1)
    k, v = pool.kv(x).reshape(x.shape[0], 2, heads, head_dim).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim) + torch.log(torch.tensor(size, dtype=x.dtype))
    pooled = pool.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1))
    pooled = pooled + pool.mlp(pool.norm(pooled))
    return model.head(model.fc_norm(pooled[0]))


def expected_token_counts(method, num_tokens, schedule, num_prefix=1):
    """Tokens leaving every block, by the rules: max(n - k, 2) kept (+1 fused), ToMe r capped."""
    counts = []
    for k in schedule:
        if method != "none" and k > 0:
            if method == "tome":
                num_tokens -= max(0, min(k, (num_tokens - num_prefix) // 2))
            else:
                kept = max(num_tokens - k, 2, num_prefix + 1)
                if kept < num_tokens:
                    num_tokens = kept + (1 if method in ("evit", "evit_n", "n_wa", "a_wn") else 0)
        counts.append(num_tokens)
    return counts
