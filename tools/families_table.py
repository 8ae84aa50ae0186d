"""Family × method table: conformance with the one-image-at-a-time reference and measured speedup / ideal.

    python tools/families_table.py                     # the table of docs/families.md
    python tools/families_table.py --size base --families vit --methods tk_n --batch 32 --rounds 7 --no-conformance

Conformance: the small test models of ``tests/reference_families.py`` and ``tests/reference_rope.py`` (random
weights, 32 px, patch 8, 4 layers, schedule 3, 5, 2, 4), max |Δ| of the patched model's output against the reference over the fused
(sdpa) and the explicit (eager, other placement) paths; pass within 1e-4. Speed: one model per family of
``--size`` (tiny: width 192, 12 layers, 3 heads, 224 px, patch 16; small: width 384, 6 heads; base: width 768,
12 heads) with random
weights, every method at ``--pool_k`` tokens per block, timed with ``pruning.benchmark.compare_speed``
(interleaved rounds, median); ideal = ratio of analytic FLOPs.
"""
import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import timm  # noqa: E402
import transformers as T  # noqa: E402
from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402

import reference_families  # noqa: E402
import reference_rope  # noqa: E402

from pruning import METHOD_NAMES, get_method  # noqa: E402
from pruning.benchmark import compare_speed  # noqa: E402
from pruning.flops import analytic_flops  # noqa: E402
from pruning.patch import apply_patch, get_state, methods_for, remove_patch  # noqa: E402
from pruning.patch.hf import naflex_inputs, takes_naflex  # noqa: E402
from reference_vit import kept_ids  # noqa: E402

FAMILIES = {  # table row: (test family, description); the test family's reference module: REFERENCE
    "vit": ("vit", "transformers ViTForImageClassification"),
    "deit": ("deit", "transformers DeiTForImageClassificationWithTeacher (cls + distillation)"),
    "dinov2": ("dinov2", "transformers Dinov2ForImageClassification (cls + patch mean)"),
    "dinov2_reg": ("dinov2_reg", "transformers Dinov2WithRegistersForImageClassification (3 registers, SwiGLU)"),
    "clip": ("clip", "transformers CLIPVisionModel (pooled output)"),
    "open_clip": ("open_clip", "OpenCLIP VisionTransformer (image features)"),
    "siglip": ("siglip", "transformers SiglipVisionModel (no class token; attention-pool output)"),
    "siglip2": ("siglip2", "transformers Siglip2VisionModel (no class token; patchified NaFlex input)"),
    "eva02": ("eva02", "timm Eva as EVA-02 (RoPE, SwiGLU, packed q/k/v with q/v bias, average pooling)"),
    "dinov3": ("dinov3", "timm Eva as DINOv3 (RoPE rotate-half, 4 registers, layer scale, average pooling)"),
    "rope_axial": ("rope_axial", "timm Eva as RoPE-ViT axial (class-token pooling)"),
    "rope_mixed": ("rope_mixed", "timm Eva as RoPE-ViT mixed (learned per-block, per-head angles)"),
    "hf_dinov3": ("hf_dinov3", "transformers DINOv3ViTModel (RoPE, 2 registers, pooled class token)"),
}
# the module holding each test family's small model and one-image-at-a-time reference
REFERENCE = {**dict.fromkeys([*reference_families.CONFIGS, *reference_families.CONFIGS_WITHOUT_CLASS_TOKEN],
                             reference_families),
             **dict.fromkeys(reference_rope.FAMILIES, reference_rope)}
TIMM_SPEED_MODELS = {  # table row: (timm name, overrides) of its speed model; the sizes come from --size
    "eva02": ("eva02_tiny_patch14_224", {}), "dinov3": ("vit_small_patch16_dinov3", {}),
    "rope_axial": ("vit_small_patch16_rope_224", {}), "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),
}
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # width, heads
REFUSED = "refused (no class token)"  # the cell of a method that reads class-token attention, on a model without
SCHEDULE = [3, 5, 2, 4]
TOLERANCE = 1e-4


def conformance(family: str, method: str) -> float:
    """Max |Δ| against the reference over the fused and the explicit path."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for attn, reduce_at in (("sdpa", None), ("eager", "block" if method == "tome" else "attn")):
        stochastic = get_method(method).stochastic  # random: the reference keeps the tokens the model drew
        reference = REFERENCE[family]
        model = apply_patch(reference.make_model(family, attn), method, SCHEDULE, reduce_at=reduce_at,
                            fused_attn=attn == "sdpa", trace_source=stochastic)
        with torch.no_grad():
            got = reference.output(model, images)
        kept = kept_ids(get_state(model).block_sources) if stochastic else None
        expected = reference.reference_outputs(remove_patch(model), images, method, SCHEDULE, reduce_at, kept=kept)
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def speed_model(family: str, size: str) -> torch.nn.Module:
    """A 224 px, patch 16, 12-layer model of ``family`` with random weights (sdpa attention)."""
    width, heads = SIZES[size]
    common = dict(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads, image_size=224, patch_size=16)
    torch.manual_seed(0)
    if family in TIMM_SPEED_MODELS:
        name, overrides = TIMM_SPEED_MODELS[family]
        model = timm.create_model(name, pretrained=False, img_size=224, patch_size=16, embed_dim=width, depth=12,
                                  num_heads=heads, **overrides)
    elif family == "open_clip":
        model = VisionTransformer(image_size=224, patch_size=16, width=width, layers=12, heads=heads, mlp_ratio=4,
                                  output_dim=512, act_layer=QuickGELU)
    else:
        cls, config = {
            "vit": (T.ViTForImageClassification, lambda: T.ViTConfig(intermediate_size=4 * width, **common)),
            "deit": (T.DeiTForImageClassificationWithTeacher,
                     lambda: T.DeiTConfig(intermediate_size=4 * width, **common)),
            "dinov2": (T.Dinov2ForImageClassification, lambda: T.Dinov2Config(**common)),
            "dinov2_reg": (T.Dinov2WithRegistersForImageClassification,
                           lambda: T.Dinov2WithRegistersConfig(num_register_tokens=3, use_swiglu_ffn=True, **common)),
            "clip": (T.CLIPVisionModel, lambda: T.CLIPVisionConfig(intermediate_size=4 * width, **common)),
            "hf_dinov3": (T.DINOv3ViTModel, lambda: T.DINOv3ViTConfig(intermediate_size=4 * width,
                                                                     num_register_tokens=2, **common)),
            "siglip": (T.SiglipVisionModel, lambda: T.SiglipVisionConfig(intermediate_size=4 * width, **common)),
            "siglip2": (T.Siglip2VisionModel, lambda: T.Siglip2VisionConfig(
                intermediate_size=4 * width, num_patches=(224 // 16) ** 2,
                **{k: v for k, v in common.items() if k != "image_size"})),
        }[family]
        model = cls._from_config(config(), attn_implementation="sdpa")
    return model.eval()


class FromImages(torch.nn.Module):
    """Images in, SigLIP 2's patchified inputs to ``model``: its speed measured from the same images as the
    other families' (the patchifying, a reshape, is in every variant's time alike)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model(**naflex_inputs(images, self.model.config.patch_size))


def speed_results(family: str, size: str, methods, pool_k: int, batch: int, rounds: int) -> dict:
    """{method: SpeedResult} of the family's speed model, every method it takes at ``pool_k`` per block."""
    model = speed_model(family, size)
    variants = {"none": model}
    for method in methods:
        variants[method] = apply_patch(copy.deepcopy(model), method, pool_k)
    unwrap = lambda m: m.model if isinstance(m, FromImages) else m  # noqa: E731
    if hasattr(model, "config") and takes_naflex(model):
        variants = {name: FromImages(variant) for name, variant in variants.items()}
    inputs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return {r.name: r for r in compare_speed(variants, inputs, "none", warmup=1, rounds=rounds,
                                             flops_of=lambda m: analytic_flops(unwrap(m)))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list")
    parser.add_argument("--methods", default=",".join(m for m in METHOD_NAMES if m != "none"), help="comma list")
    parser.add_argument("--size", default="tiny", choices=list(SIZES),
                        help="speed models: ViT-Ti, ViT-S or ViT-B sized")
    parser.add_argument("--batch", type=int, default=16, help="images per timed forward")
    parser.add_argument("--pool_k", type=int, default=10, help="tokens removed per block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = PyTorch's default")
    parser.add_argument("--no-conformance", dest="conformance", action="store_false", help="skip the conformance check")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip the timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    families, methods = args.families.split(","), args.methods.split(",")
    for name in families:
        if name not in FAMILIES:
            parser.error(f"--families: unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    for name in methods:
        if name not in METHOD_NAMES:
            parser.error(f"--methods: unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")

    print(f"speed: {args.size} models (224 px, patch 16, 12 layers), batch {args.batch}, pool_k {args.pool_k}, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads; "
          f"load before: {open('/proc/loadavg').read().split()[:3]}")
    print()
    print("| family | method | max abs diff | conforms (1e-4) | speedup | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|")
    start = time.time()
    for family in families:
        runs = methods_for(REFERENCE[FAMILIES[family][0]].make_model(FAMILIES[family][0]))
        for method in [m for m in methods if m not in runs]:
            print(f"| {family} | {method} | {REFUSED} | - | - | - | - |", flush=True)
        methods_run = [m for m in methods if m in runs]
        results = {}
        if args.speed:
            results = speed_results(FAMILIES[family][0], args.size, methods_run, args.pool_k, args.batch, args.rounds)
        for method in methods_run:
            diff = conformance(FAMILIES[family][0], method) if args.conformance else float("nan")
            verdict = "-" if not args.conformance else ("yes" if diff <= TOLERANCE else "NO")
            speed = results.get(method)
            cells = ["-", "-", "-"] if speed is None else [f"{speed.speedup:.3f}", f"{speed.ideal_speedup:.3f}",
                                                         f"{speed.efficiency:.3f}"]
            print(f"| {family} | {method} | {diff:.1e} | {verdict} | " + " | ".join(cells) + " |", flush=True)
    print()
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
