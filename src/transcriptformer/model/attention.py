"""Expression-aware causal self-attention and its backends.

The attention score of query ``q`` and key ``kv`` is (SPEC section 5)::

    s = q.k * scale + bias[kv] * (q_idx > kv_idx or embed_mode)
    s = cap * tanh(clamp(s, -1e6, 1e6) / cap)            # softcap, when cap > 0 (the clamp changes nothing)
    allowed iff kv_idx <= q_idx and key kv is not padding

where ``bias = log1p(count + eps)`` of the (shifted) input sequence. Two backends compute exactly this:

* ``"flex"``: :func:`torch.nn.attention.flex_attention.flex_attention` with a :class:`BlockMask`, compiled on
  CUDA. The block mask is built once per forward from counts of visible keys per block
  (:func:`padding_block_mask`) and shared by all layers, and a model keeps the masks of recent padding patterns
  (:class:`BlockMaskCache`) to reuse them in later batches. A batch size or length that changes from batch to
  batch is compiled once more as a dynamic size, not once per value (:func:`compiled_flex_attention`).
* ``"chunked"``: plain tensor math over blocks of query rows, so that no more than ``max_score_elements``
  scores exist at a time. It needs no ``torch.compile`` and is the default on CPU.
* ``"dense"``: the same math on the whole score matrix at once (the straightforward reference; memory grows
  with the square of the length).

Mask and score functions are pure element-wise tensor expressions: no Python branching on tensor values and
key indices clamped into range, so that ``create_block_mask`` and ``vmap`` accept them for any batch size and
any length, including lengths that are not a multiple of the block size. They capture tensors and constant
settings only, never a Python number that changes with the batch (such as the last position): the compiler
would guard on its value or lift it as a dynamic scalar, which the CPU code generation of torch 2.13 fails to
build.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from transcriptformer.model import aot
from transcriptformer.runtime import BACKENDS, Backend

# Block size of flex attention's block masks.
FLEX_BLOCK_SIZE = 128

# Largest number of attention scores (batch x heads x query rows x keys) the chunked backend holds at once.
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 22


def softcap(x: Tensor, cap: float) -> Tensor:
    """Smoothly limit ``x`` to ``(-cap, cap)``; identity when ``cap <= 0``.

    The original clamps ``x`` to +-1e6 first; tanh is exactly +-1 in floating point far below that bound (and at
    +-inf), so the clamp changes no value and is left out.
    """
    if cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


def softcap_(x: Tensor, cap: float) -> Tensor:
    """:func:`softcap` in place (the same values bit for bit); out of place where autograd records ``x``."""
    if x.requires_grad:
        return softcap(x, cap)  # the gradient of tanh needs its output unchanged
    if cap > 0:
        x.div_(cap).tanh_().mul_(cap)
    return x


def padding_mask_mod(kv_is_pad: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Causal mask that also hides padded keys.

    Parameters
    ----------
    kv_is_pad : Tensor
        ``(B, N)`` bool, True where the key position is padding.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        last = kv_is_pad.shape[1] - 1  # from the tensor inside: a captured int would change with every length
        in_range = kv_idx <= last
        is_pad = kv_is_pad[b, torch.clamp(kv_idx, 0, last)]
        return (kv_idx <= q_idx) & in_range & ~is_pad

    return mask_mod


def count_bias_score_mod(
    count_bias: Tensor, cap: float, embed_mode: bool
) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Add the key's log-count bias (strictly below the diagonal, or everywhere in embed mode), then softcap.

    Parameters
    ----------
    count_bias : Tensor
        ``(B, N)`` float, ``log1p(count + eps)`` of each key position.
    cap : float
        Softcap; no cap when ``<= 0``.
    embed_mode : bool
        Whether the bias also applies on the diagonal (inference).
    """

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        last = count_bias.shape[1] - 1  # as in padding_mask_mod
        bias = count_bias[b, torch.clamp(kv_idx, 0, last)]
        applies = (q_idx > kv_idx) | embed_mode
        return softcap(score + bias * applies, cap)

    return score_mod


@dataclass
class AttentionInputs:
    """Everything that the attention layers of one forward pass share.

    Attributes
    ----------
    count_bias : Tensor
        ``(B, N)`` log-count bias of each key.
    kv_is_pad : Tensor
        ``(B, N)`` True where a key is padding.
    softcap : float
        Score softcap.
    embed_mode : bool
        Apply the count bias on the diagonal too.
    block_mask : BlockMask or None
        Built for the flex backend only.
    max_score_elements : int or None
        Score block bound of the chunked backend; None for the whole matrix at once.
    """

    count_bias: Tensor
    kv_is_pad: Tensor
    softcap: float
    embed_mode: bool
    block_mask: BlockMask | None = None
    max_score_elements: int | None = DEFAULT_MAX_SCORE_ELEMENTS

    @property
    def score_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The flex score modification for these inputs."""
        return count_bias_score_mod(self.count_bias, self.softcap, self.embed_mode)


def resolve_backend(backend: Backend, device: torch.device) -> Literal["flex", "chunked", "dense"]:
    """Pick the attention backend: compiled flex attention on CUDA, chunked math elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "chunked"
    return backend


class BlockMaskCache:
    """The flex block masks of recently seen padding patterns, reused instead of rebuilt.

    A block mask depends only on which positions are padding. Length-aware batching gives the many cells longer
    than the sequence length identical all-valid patterns, so their batches share one block mask.

    Parameters
    ----------
    max_entries : int
        Patterns kept (least recently used first out); 0 builds every mask anew.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._masks: OrderedDict[tuple, BlockMask] = OrderedDict()

    def __len__(self) -> int:
        return len(self._masks)

    def get(self, is_pad: Tensor, block_size: int) -> BlockMask:
        """The block mask of the ``(B, N)`` padding pattern ``is_pad`` (causal, padded keys hidden)."""
        batch, length = is_pad.shape
        key = (str(is_pad.device), batch, length, block_size, is_pad.cpu().numpy().tobytes())
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        mask = padding_block_mask(is_pad, block_size)
        if self.max_entries > 0:
            self._masks[key] = mask
            while len(self._masks) > self.max_entries:
                self._masks.popitem(last=False)
        return mask


def padding_block_mask(is_pad: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The block mask of :func:`padding_mask_mod` for the ``(B, N)`` padding pattern ``is_pad``.

    The same mask as ``create_block_mask(padding_mask_mod(is_pad), B, None, N, N, BLOCK_SIZE=block_size)``, built
    from the number of visible keys in each block instead of the mask's value at all ``B x N x N`` positions: a
    training batch (a new padding pattern every time) then costs ``B x (N / block_size)^2`` operations, not
    ``B x N^2``.

    A (query block, key block) pair is *full* when every query of the block (all within the length) sees every
    key of the key block: the key block lies wholly before the query block and holds no padding. It is *partial*
    when some query sees some key: the key block is not after the query block and holds a key that is not padding.
    """
    batch, length = is_pad.shape
    blocks = -(-length // block_size)
    extra = blocks * block_size - length
    visible = F.pad(~is_pad, (0, extra)).view(batch, blocks, block_size).sum(-1)  # (B, blocks) keys not padding
    index = torch.arange(blocks, device=is_pad.device)
    q_block, kv_block = index[:, None], index[None, :]  # (blocks, 1), (1, blocks)
    queries_all_in_range = (q_block + 1) * block_size <= length
    key_block_before = (kv_block + 1) * block_size - 1 <= q_block * block_size  # every key <= every query
    full = (key_block_before & queries_all_in_range) & (visible == block_size)[:, None, :]  # (B, blocks, blocks)
    some = (kv_block <= q_block) & (visible > 0)[:, None, :]
    partial = some & ~full
    kv_num_blocks, kv_indices = _ordered_blocks(partial)
    full_num_blocks, full_indices = _ordered_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=padding_mask_mod(is_pad),
        seq_lengths=(length, length),
    )


def _ordered_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, Q, K)`` bool -> ``(B, 1, Q)`` number of key blocks and ``(B, 1, Q, K)`` their indices first.

    The layout of ``create_block_mask``: the selected key blocks of each query block in increasing order, then
    the others.
    """
    dense = blocks[:, None].to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return dense.sum(-1, dtype=torch.int32), indices


def preferred_length_multiple(backend: Backend, device: torch.device) -> int:
    """Multiple to round sequence lengths up to for ``backend`` on ``device``.

    The block size for (compiled) flex attention, which then sees few distinct shapes and recompiles little;
    1 (exact trimming) for the other backends.
    """
    return FLEX_BLOCK_SIZE if resolve_backend(backend, device) == "flex" else 1


def build_attention_inputs(
    counts: Tensor,
    is_pad: Tensor,
    *,
    eps: float,
    cap: float,
    embed_mode: bool,
    backend: Literal["flex", "chunked", "dense"],
    block_size: int = FLEX_BLOCK_SIZE,
    block_masks: BlockMaskCache | None = None,
) -> AttentionInputs:
    """Prepare the shared attention inputs of one forward pass.

    Parameters
    ----------
    counts : Tensor
        ``(B, N)`` counts of the input sequence (aux positions count 1).
    is_pad : Tensor
        ``(B, N)`` True where the input position is padding.
    block_masks : BlockMaskCache, optional
        Where the flex backend finds block masks of padding patterns it has seen.
    """
    inputs = AttentionInputs(torch.log1p(counts + eps), is_pad, cap, embed_mode)
    if backend == "dense":
        inputs.max_score_elements = None
    if backend == "flex":
        cache = block_masks if block_masks is not None else BlockMaskCache(max_entries=0)
        inputs.block_mask = cache.get(is_pad, block_size)
    return inputs


@functools.cache
def compiled_flex_attention(backend: str | Callable = "inductor") -> Callable[..., Tensor]:
    """``flex_attention`` compiled by ``torch.compile`` with ``backend`` (one compiled function per backend).

    The default dynamic-shape policy: a size is a constant until it changes, then dynamic. Batches of any sizes and
    lengths therefore share at most three compilations (the first shape, a new length, a new batch size) for each
    grad mode (training, validation), embed mode and precision, and one more when a batch of one cell or of at
    most one block comes after larger ones (``torch.compile`` specializes sizes 0 and 1). The softcap and embed
    mode stay constants. The ``"eager"`` backend traces and guards as the default one without generating code;
    ``torch._dynamo.testing.CompileCounterWithBackend`` counts the compilations.
    """
    return torch.compile(flex_attention, backend=backend)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
    """Attention through FlexAttention; compiled on CUDA, eager (reference speed) elsewhere."""
    attend = compiled_flex_attention() if q.is_cuda else flex_attention
    return attend(q, k, v, score_mod=inputs.score_mod, block_mask=inputs.block_mask)


def chunked_attend(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
    """Exact attention in blocks of query rows; keys beyond the block's last row are skipped (causal).

    Parameters
    ----------
    q, k, v : Tensor
        ``(B, H, N, D)``.
    inputs : AttentionInputs
        Shared bias and padding of this forward pass, and the bound on scores held at once.

    Returns
    -------
    Tensor
        ``(B, H, N, D)``; a query with no visible key gets zeros, as in flex attention.
    """
    # Contiguous operands keep every block's matmuls free of copies; the scale is folded into the queries.
    q = q.contiguous() * (1.0 / math.sqrt(q.shape[-1]))
    return attend_row_blocks(q, k.contiguous(), v.contiguous(), inputs)


def attend_row_blocks(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
    """Attention of the last ``R`` of ``K`` positions over all ``K``, in blocks of query rows.

    A block of rows sees the keys up to its last row only, and no more than ``inputs.max_score_elements`` scores
    exist at a time. The whole sequence (``R = K``) for :func:`chunked_attend`; the positions that follow cached
    ones for a pass with a :class:`KVCache`.

    Parameters
    ----------
    q : Tensor
        ``(B, H, R, D)`` queries of the positions ``K - R .. K - 1``, already scaled by ``1 / sqrt(D)``.
    k, v : Tensor
        ``(B, H, K, D)``.
    inputs : AttentionInputs
        Bias and padding of the ``K`` keys, and the bound on scores held at once.

    Returns
    -------
    Tensor
        ``(B, H, R, D)``; a query with no visible key gets zeros, as in flex attention.
    """
    batch, heads, rows, _ = q.shape
    keys = k.shape[2]
    first = keys - rows
    bound = inputs.max_score_elements
    if bound is not None and compiles_scores(q):
        # The compiled loop's bfloat16 scores and probabilities take half the memory of the eager float32 ones;
        # larger blocks also spare the bfloat16 products copies of their key blocks (one per block)
        bound *= 2
    rows_per_block = rows if bound is None else max(1, bound // (batch * heads * keys))
    out = torch.empty_like(q)
    for start in range(0, rows, rows_per_block):
        stop = min(rows, start + rows_per_block)
        block_keys = first + stop
        out[:, :, start:stop] = attend_rows(
            q[:, :, start:stop], k[:, :, :block_keys], v[:, :, :block_keys], first + start, inputs
        )
    return out


def attend_rows(q: Tensor, k: Tensor, v: Tensor, start: int, inputs: AttentionInputs) -> Tensor:
    """Attention of the query rows ``start .. start + R - 1`` over the keys ``0 .. start + R - 1``.

    The one implementation of the score rule for the chunked backend and for decoding with a key/value cache.
    The two products run in the inputs' precision (bfloat16 under bfloat16 autocast). On the CPU the score work
    between them is one compiled loop where it pays (:func:`compiled_probabilities`); otherwise it runs eagerly.

    Parameters
    ----------
    q : Tensor
        ``(B, H, R, D)`` queries, already scaled by ``1 / sqrt(D)``.
    k, v : Tensor
        ``(B, H, K, D)`` with ``K = start + R``: every key the rows may see.
    start : int
        Position of the first query row.
    inputs : AttentionInputs
        Bias and padding of (at least) the ``K`` keys.
    """
    stop = k.shape[2]
    kv_is_pad = inputs.kv_is_pad[:, :stop]
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, R, K)
    q_idx = torch.arange(start, stop, device=q.device)[:, None]  # (R, 1)
    sees_nothing = q_idx < _first_visible_key(kv_is_pad)[:, None, None, None]  # (B, 1, R, 1): all -inf rows
    count_bias, cap, embed_mode = inputs.count_bias[:, :stop], inputs.softcap, inputs.embed_mode
    sees_nothing = sees_nothing if sees_nothing.any() else None
    if compiles_scores(scores):  # the first row is derived from the shapes there (start = K - R)
        probs = compiled_probabilities(scores, count_bias, kv_is_pad, cap, embed_mode, sees_nothing, v.dtype)
    else:
        probs = probabilities(scores, count_bias, kv_is_pad, start, cap, embed_mode, sees_nothing, v.dtype)
    return torch.matmul(probs, v)


def compiles_scores(x: Tensor) -> bool:
    """Whether attention over ``x`` (queries or products) computes its probabilities with a compiled loop.

    For bfloat16 products on the CPU, where the eager steps would take most of the time of attention. float32 runs
    the eager steps always: its numbers then depend neither on the cache folder's packages nor on how a run was
    split into processes or resumed (the compiled loop agrees with them within float32 rounding, not bit for bit).
    """
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def probabilities(
    scores: Tensor,
    count_bias: Tensor,
    kv_is_pad: Tensor,
    start: int,
    cap: float,
    embed_mode: bool,
    sees_nothing: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """Attention probabilities of the ``(B, H, R, K)`` products ``q.k`` of the rows ``start .. K - 1``.

    Computed in float32 (float64 for float64 products) and returned in ``dtype``. The score tensor is updated in
    place: on the CPU a new tensor of its size per step costs more than the step itself.

    Parameters
    ----------
    count_bias, kv_is_pad : Tensor
        ``(B, K)`` log-count bias and padding of the keys.
    sees_nothing : Tensor or None
        ``(B, 1, R, 1)`` True for the rows that see no key, which get zeros; None when there are none.
    """
    stop = scores.shape[-1]
    positions = torch.arange(stop, device=scores.device)
    q_idx = positions[start:stop, None]  # (R, 1)
    kv_idx = positions[None, :]  # (1, K)
    key_bias = count_bias[:, None, None, :]  # (B, 1, 1, K)
    bias = key_bias if embed_mode else key_bias * (q_idx > kv_idx)
    key_mask = torch.zeros_like(kv_is_pad, dtype=torch.float32).masked_fill(kv_is_pad, float("-inf"))[:, None, None]
    causal_mask = torch.zeros(stop - start, stop, device=scores.device).masked_fill(kv_idx > q_idx, float("-inf"))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bfloat16 products: to float32
    scores += bias
    scores = softcap_(scores, cap)
    scores += key_mask + causal_mask
    if sees_nothing is None:
        return torch.softmax(scores, dim=-1).to(dtype)
    probs = torch.softmax(scores.masked_fill(sees_nothing, 0.0), dim=-1)  # not of all -inf: NaN, in gradients too
    return probs.masked_fill(sees_nothing, 0.0).to(dtype)


def compiled_probabilities(
    scores: Tensor,
    count_bias: Tensor,
    kv_is_pad: Tensor,
    cap: float,
    embed_mode: bool,
    sees_nothing: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """:func:`probabilities` of the last ``R`` of ``K`` rows (``start = K - R``) as one compiled loop where it pays.

    Used for bfloat16 products on the CPU (:func:`compiles_scores`). Without gradients the loop is the
    :class:`ScoreLoop` package of these settings, compiled once per machine and loaded from the user's cache folder
    (:class:`CachedScoreLoop`); with gradients (training) it goes through ``torch.compile`` in each process. Wherever
    it cannot compile, it runs eagerly (warned once).
    """
    if scores.requires_grad:
        return _traced_probabilities(scores, count_bias, kv_is_pad, cap, embed_mode, sees_nothing, dtype)
    return cached_score_loop(cap, embed_mode, scores.dtype, dtype)(scores, count_bias, kv_is_pad, sees_nothing)


# Score work (batch x heads x query rows x keys) that a process computes eagerly before it builds the compiled
# loop whose package the cache folder lacks: a short run does not pay the build (about 20 s of CPU), a longer one
# builds it once for every later process.
BUILD_SCORE_LOOP_AFTER = 2_000_000_000


class ScoreLoop(nn.Module):
    """:func:`probabilities` with constant settings, in the form that is exported and compiled ahead of time.

    The first row is derived from the shapes (``start = K - R``, as in every call of :func:`attend_rows`), so the
    loop takes tensors only and every size may change from call to call; ``sees_nothing`` is always a tensor.
    """

    def __init__(self, cap: float, embed_mode: bool, dtype: torch.dtype):
        super().__init__()
        self.cap, self.embed_mode, self.dtype = cap, embed_mode, dtype

    def forward(self, scores: Tensor, count_bias: Tensor, kv_is_pad: Tensor, sees_nothing: Tensor | None) -> Tensor:
        """:func:`probabilities` of the last ``R`` of the ``K`` rows of ``scores``."""
        start = scores.shape[-1] - scores.shape[-2]
        return probabilities(scores, count_bias, kv_is_pad, start, self.cap, self.embed_mode, sees_nothing, self.dtype)

    def example_inputs(self, scores_dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Inputs that fix dtypes and layout for the export (every size stays dynamic)."""
        batch, heads, rows, keys = 4, 8, 64, 2048
        sees_nothing = torch.zeros(batch, 1, rows, 1, dtype=torch.bool)
        padding = torch.zeros(batch, keys, dtype=torch.bool)
        return (
            torch.zeros(batch, heads, rows, keys, dtype=scores_dtype),
            torch.zeros(batch, keys),
            padding,
            sees_nothing,
        )

    @staticmethod
    def dynamic_shapes() -> tuple[dict[int, object], ...]:
        """Batch, heads, rows and keys dynamic, the same names where two inputs share a size."""
        dim = torch.export.Dim
        batch, heads, rows, keys = dim("batch"), dim("heads"), dim("rows"), dim("keys")
        return {0: batch, 1: heads, 2: rows, 3: keys}, {0: batch, 1: keys}, {0: batch, 1: keys}, {0: batch, 2: rows}


class CachedScoreLoop:
    """The compiled :class:`ScoreLoop` of one setting, kept across processes in the user's cache folder.

    Loaded (milliseconds) when the cache folder holds it; otherwise the scores run eagerly until this process has
    computed ``build_after`` score elements, then the package is compiled, saved (:mod:`transcriptformer.model.aot`)
    and used. A loop that cannot be built or loaded runs eagerly, warned once.

    Parameters
    ----------
    cap, embed_mode, dtype
        The constant settings of :func:`probabilities`.
    scores_dtype : torch.dtype
        Dtype of the products.
    cache_dir : str or Path, optional
        The cache folder; :func:`transcriptformer.runtime.default_cache_dir` when omitted.
    build_after : int
        Score elements computed eagerly before a missing package is built.
    """

    def __init__(
        self,
        cap: float,
        embed_mode: bool,
        scores_dtype: torch.dtype,
        dtype: torch.dtype,
        cache_dir: str | Path | None = None,
        build_after: int = BUILD_SCORE_LOOP_AFTER,
    ):
        self.module = ScoreLoop(cap, embed_mode, dtype)
        self.scores_dtype = scores_dtype
        sources = [inspect.getsource(f) for f in (probabilities, softcap_, ScoreLoop)]
        settings = [hashlib.sha256("".join(sources).encode()).hexdigest(), cap, embed_mode, scores_dtype, dtype]
        self.path = aot.package_path("attention_scores", settings, cache_dir)
        self.loop = aot.load_package(self.path)
        self.build_after = build_after
        self.eager_elements = 0
        self.build_failed = False

    def __call__(self, scores: Tensor, count_bias: Tensor, kv_is_pad: Tensor, sees_nothing: Tensor | None) -> Tensor:
        """:func:`probabilities` of the last ``R`` of the ``K`` rows of ``scores``: compiled, else eagerly."""
        if self.loop is None and not self.build_failed:
            self.eager_elements += scores.numel()
            if self.eager_elements > self.build_after:
                self.build()
        if self.loop is None or count_bias.dtype != torch.float32:
            return self.module(scores, count_bias, kv_is_pad, sees_nothing)
        if sees_nothing is None:
            sees_nothing = torch.zeros(scores.shape[0], 1, scores.shape[2], 1, dtype=torch.bool)
        # The compiled code indexes its inputs as laid out contiguously (the key slices of a row block are not)
        inputs = (scores, count_bias, kv_is_pad, sees_nothing)
        return self.loop(*(x.contiguous() for x in inputs))

    def build(self) -> None:
        """Compile the package into the cache folder and use it (eager from now on if that fails)."""
        inputs = self.module.example_inputs(self.scores_dtype)
        self.loop = aot.build_package(self.module, inputs, ScoreLoop.dynamic_shapes(), self.path)
        self.build_failed = self.loop is None


@functools.cache
def cached_score_loop(cap: float, embed_mode: bool, scores_dtype: torch.dtype, dtype: torch.dtype) -> CachedScoreLoop:
    """The :class:`CachedScoreLoop` of these settings in the user's cache folder (one per process)."""
    return CachedScoreLoop(cap, embed_mode, scores_dtype, dtype)


def _traced_probabilities(scores: Tensor, count_bias: Tensor, kv_is_pad: Tensor, *args) -> Tensor:
    """:func:`probabilities` of the last rows compiled by ``torch.compile`` (with gradients); eager where it fails."""
    global _compile_failed
    start = scores.shape[-1] - scores.shape[-2]
    if not _compile_failed:
        try:
            return _compiled_probabilities()(scores, count_bias, kv_is_pad, start, *args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            _compile_failed = True
            warnings.warn(f"bf16 attention runs uncompiled, slower: torch.compile failed ({error})", stacklevel=2)
    return probabilities(scores, count_bias, kv_is_pad, start, *args)


_compile_failed = False


@functools.cache
def _compiled_probabilities() -> Callable[..., Tensor]:
    # Dynamic sizes from the start: every row block and length shares one compiled loop.
    return torch.compile(probabilities, dynamic=True)


def _first_visible_key(kv_is_pad: Tensor) -> Tensor:
    """``(B,)`` index of each row's first key that is not padding (N when there is none)."""
    visible = ~kv_is_pad
    return torch.where(visible.any(1), visible.int().argmax(1), kv_is_pad.shape[1])


class KVCache:
    """Keys and values of every layer for the positions decoded so far, with their count bias and padding.

    Decoding position ``n`` then costs one query over ``n + 1`` cached keys per layer instead of a full pass over
    all ``n + 1`` positions (:meth:`transcriptformer.model.transcriptformer.TranscriptFormer.decode`).

    Parameters
    ----------
    num_layers, batch, heads, head_dim : int
        Shape of the model and batch.
    capacity : int
        Positions the cache holds at most (aux tokens, ``[START]`` and the genes to decode).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int, like: Tensor):
        self.keys = like.new_zeros(num_layers, batch, heads, capacity, head_dim)  # (layers, B, H, C, D)
        self.values = like.new_zeros(num_layers, batch, heads, capacity, head_dim)
        self.count_bias = like.new_zeros(batch, capacity, dtype=torch.float32)  # (B, C)
        self.kv_is_pad = torch.ones(batch, capacity, dtype=torch.bool, device=like.device)  # (B, C)
        self.length = 0  # positions held
        self.new = 0  # positions being added by the current pass

    @property
    def capacity(self) -> int:
        """Positions the cache holds at most."""
        return self.kv_is_pad.shape[1]

    def append(self, count_bias: Tensor, kv_is_pad: Tensor) -> None:
        """Start a pass over ``T`` new positions with ``(B, T)`` count bias and padding."""
        new = count_bias.shape[1]
        if self.length + new > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self.length + new} asked for")
        self.count_bias[:, self.length : self.length + new] = count_bias
        self.kv_is_pad[:, self.length : self.length + new] = kv_is_pad
        self.new = new

    def commit(self) -> None:
        """End the pass: its positions join the cached ones."""
        self.length += self.new
        self.new = 0

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cache layer ``layer``'s ``(B, H, T, D)`` new keys and values; returns all its keys and values so far."""
        stop = self.length + self.new
        self.keys[layer, :, :, self.length : stop] = k
        self.values[layer, :, :, self.length : stop] = v
        return self.keys[layer, :, :, :stop], self.values[layer, :, :, :stop]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with four projections ``linears.0..3`` (Q, K, V, output)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.linears = nn.ModuleList([nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(4)])

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``(B, H, N, D)`` of ``x`` of shape ``(B, N, E)``."""
        batch, length, _ = x.shape
        q, k, v = (lin(x).view(batch, length, self.num_heads, -1).transpose(1, 2) for lin in self.linears[:3])
        return q, k, v

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: tuple[KVCache, int] | None = None) -> Tensor:
        """Attend over ``x`` of shape ``(B, N, E)``; returns ``(B, N, E)``.

        With ``cache`` (a :class:`KVCache` and this layer's index), ``x`` holds the ``N`` positions that follow
        the cached ones, which they attend to as well; their keys and values are added to the cache.
        """
        batch, length, width = x.shape
        q, k, v = self.project(x)
        if cache is not None:
            kv_cache, layer = cache
            k, v = kv_cache.store(layer, k, v)
            out = attend_row_blocks(q * (1.0 / math.sqrt(q.shape[-1])), k, v, inputs)
        elif inputs.block_mask is not None:
            out = flex_attend(q, k, v, inputs)
        else:
            out = chunked_attend(q, k, v, inputs)
        return self.linears[3](out.transpose(1, 2).reshape(batch, length, width))
