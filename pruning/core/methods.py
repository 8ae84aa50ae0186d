"""The compression methods, as data.

Each method is one row of ``METHODS``: how it reduces the token set (``prune`` drops tokens,
optionally fusing the dropped ones into one token; ``merge`` is Token Merging), which score
decides the tokens that are kept, and which weights form the fused token. Two rows are controls, not
methods under test: ``random`` (a uniformly random kept set: is a score better than chance?) and
``low_norm`` (the paper's score inverted: does the norm point the right way?).
"""
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

Criterion = Literal["attn", "norm"]  # what a fused token's weights come from
KeepCriterion = Literal["attn", "norm", "low_norm", "random"]  # what decides the kept tokens (scoring.keep_scores)
Reduction = Literal["none", "prune", "merge"]
Placement = Literal["block", "attn"]


@dataclass(frozen=True)
class CompressionMethod:
    """What a method scores and how it reduces.

    keep_by: ``attn`` (class-token attention, head-averaged), ``norm`` (L2 norm of the token), ``low_norm``
        (the smallest L2 norms) or ``random`` (a uniformly random subset, drawn afresh on every forward from
        the model's own generator, ``pruning.core.state.seed_draws``).
    fuse_by: weights of the fused token made from the dropped tokens: ``attn`` (their class-token
        attention, not renormalised, as in EViT) or ``norm`` (softmax of their norms over the dropped
        tokens); None drops them outright.
    default_reduce_at: ``block`` reduces after the whole block (the paper's placement), ``attn``
        between attention and MLP (EViT's and ToMe's placement).
    control: a control for the methods under test (a baseline of chance or an inverted score), not a method.
    """

    name: str
    reduction: Reduction
    keep_by: Optional[KeepCriterion] = None
    fuse_by: Optional[Criterion] = None
    default_reduce_at: Placement = "block"
    control: bool = False
    summary: str = ""

    @property
    def needs_cls_attention(self) -> bool:
        return "attn" in (self.keep_by, self.fuse_by)

    @property
    def fuses(self) -> bool:
        return self.fuse_by is not None

    @property
    def needs_norms(self) -> bool:
        return self.keep_by in ("norm", "low_norm") or self.fuse_by == "norm"

    @property
    def stochastic(self) -> bool:
        """Whether the kept tokens are drawn at random, so that even an evaluation depends on a seed."""
        return self.keep_by == "random"


METHODS: Dict[str, CompressionMethod] = {m.name: m for m in (
    CompressionMethod("none", "none", summary="no compression"),
    CompressionMethod("tk", "prune", keep_by="attn", summary="Top-K by class-token attention"),
    CompressionMethod("tk_n", "prune", keep_by="norm", summary="Top-K by token L2 norm (the paper's method)"),
    CompressionMethod("evit", "prune", keep_by="attn", fuse_by="attn",
                      summary="EViT: Top-K by attention, dropped tokens fused with attention weights"),
    CompressionMethod("evit_n", "prune", keep_by="norm", fuse_by="norm",
                      summary="Top-K by norm, dropped tokens fused with softmax-of-norm weights"),
    CompressionMethod("n_wa", "prune", keep_by="norm", fuse_by="attn",
                      summary="TNWAF: Top-K by norm, fused with attention weights"),
    CompressionMethod("a_wn", "prune", keep_by="attn", fuse_by="norm",
                      summary="TAWNF: Top-K by attention, fused with softmax-of-norm weights"),
    CompressionMethod("tome", "merge", default_reduce_at="attn",
                      summary="Token Merging (Bolya et al., ICLR 2023), bipartite soft matching on keys"),
    CompressionMethod("random", "prune", keep_by="random", control=True,
                      summary="control: a uniformly random subset of the tokens, drawn afresh every forward"),
    CompressionMethod("low_norm", "prune", keep_by="low_norm", control=True,
                      summary="control: Top-K by the smallest token L2 norm (the paper's score inverted)"),
)}

METHOD_NAMES: Tuple[str, ...] = tuple(METHODS)
CONTROL_NAMES: Tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.control)
PLACEMENTS: Tuple[str, ...] = ("block", "attn")


def get_method(name: str, argument: str = "select_method") -> CompressionMethod:
    """The method called ``name``; ValueError naming ``argument`` (the caller's name for it) if there is none."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{argument}: unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}") from None
