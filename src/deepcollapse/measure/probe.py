r"""Measure deep neural collapse in any PyTorch model: a streaming per-layer probe.

:class:`DNCProbe` attaches forward hooks to chosen modules, flattens each module's output per sample to
``h_i`` (``D`` = product of the non-batch dimensions), streams a data loader through the model under
``torch.no_grad()`` and feeds :class:`~deepcollapse.measure.accumulate.ClassAccumulator` (float64, on the
features' device). The metrics come from :mod:`deepcollapse.measure.metrics` (``dnc_metrics``, ``nc3_span``,
``nc3_duality``, ``nc3_zhu``, ``ncc_accuracy``, ``nc4``); nothing is re-derived here.

Rows. Every *call* of a hooked module is its own row: a module that runs once per forward is named as in
``model.named_modules()``; one that runs ``n > 1`` times (a residual block reusing one ``self.relu``) gives
rows ``name#1 .. name#n``, in the order the calls start. Rows appear in forward order.

What is measured per row (module output ``h``), with the names of :data:`deepcollapse.measure.metrics.METRICS`:

* the :func:`~deepcollapse.measure.metrics.dnc_metrics` of ``h`` (NC1, NC2, CDNV, ranks, ...), plus
  ``dim`` (``D``) and ``samples`` (``N``);
* ``ncc_accuracy``: the fraction of samples whose nearest class mean of ``h`` is their label (needs the
  means before the last pass: ``passes=2``, or a ``reference``);
* ``nc4`` (Papyan et al. 2020), when the model has a classifier: the fraction of samples where the
  nearest class mean of ``h`` differs from the classifier's prediction ``argmax`` of its output. Papyan's
  NC4 is this number on the features that enter the classifier. The accumulators count both in the last
  pass; features are held (cloned) until the forward has produced the prediction;
* for a module with a 2-D ``weight`` ``W`` (``nn.Linear`` and look-alikes), NC3 pairs ``W`` with the class
  means of the module's **input** (``W`` acts on the features that enter it): ``nc3_span`` and, for ``K``
  rows, ``nc3_zhu`` and Papyan's self-duality, ``nc3_duality`` (centred means) for a module with a bias,
  ``nc3_duality_uncentred`` without one. The classifier always gets these, in its own row.

The classifier is the model's last ``nn.Linear`` with ``K`` outputs (``classifier="auto"``), a module you
name, or none (``classifier=None``).

Test-set protocol (Galanti et al. 2022): ``measure(test_loader, reference=train_stats)`` computes
``ncc_accuracy`` and ``nc4`` against the *reference* class means (``probe.stats`` of a train-set
measurement); every other metric uses the test set's own statistics. Test samples of classes the reference
lacks are left out of those two. With a reference, one pass suffices for the NCC metrics.

Model state. The probe measures in eval mode (``mode="eval"``, default); ``mode="train"`` measures in
train mode with a warning (dropout and batch statistics make the two passes see different features).
Either way the training flags of every module and every buffer (BatchNorm running statistics,
``num_batches_tracked``) are restored afterwards, so the model is left exactly as it was.

Two passes. With ``passes=2`` (default) the loader is iterated twice and must yield the same samples
(shuffling is fine). A ``DataLoader`` that shuffles with ``drop_last=True`` drops different samples in each
pass; it is refused when measuring starts, and any loader whose second pass yields more samples of a
class than the first is stopped at that batch. Hooks are removed after every batch, also after an error.

Under DDP, run the probe unchanged on every rank with its shard of the data: each pass ends with a sum
all-reduce of the statistics, so every rank returns the metrics of the full data. Shards may be uneven, and
a rank may have no batch at all. Shard without padding (``DistributedSampler`` repeats samples to even the
shards out, and those would be counted twice).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deepcollapse._validate import DeepCollapseError, check_labels
from deepcollapse.measure.accumulate import DEFAULT_MAX_COV_BYTES, ClassAccumulator, _dist_ready
from deepcollapse.measure.metrics import ClassStats, dnc_metrics, nc3_duality, nc3_span, nc3_zhu, nc4, ncc_accuracy
from deepcollapse.measure.stats import EPS64, Weighting

__all__ = ["LABEL_KEYS", "SHORTHANDS", "DNCProbe", "as_class_labels", "resolve_layers"]

SHORTHANDS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "relu": (nn.ReLU,),
}
LABEL_KEYS = ("labels", "label", "targets", "target", "y")  # where a dict batch keeps its labels

LayerSpec = str | type[nn.Module] | nn.Module | Sequence[str | type[nn.Module] | nn.Module]
BatchFn = Callable[[Any], tuple[Any, Any]]
F64 = torch.float64


# --------------------------------------------------------------------------------------- layers


def _wrapped_prefix(model: nn.Module) -> str:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return "module." if isinstance(model, wrappers) else ""


def _named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    prefix = _wrapped_prefix(model)
    return [(n, m) for n, m in model.named_modules() if n and n != prefix.rstrip(".")]


def _module_hits(model: nn.Module, named: list[tuple[str, nn.Module]], spec: Any) -> list[tuple[str, nn.Module]]:
    prefix = _wrapped_prefix(model)
    by_name = dict(named)
    if isinstance(spec, str) and (spec in by_name or prefix + spec in by_name):
        key = spec if spec in by_name else prefix + spec
        return [(key, by_name[key])]
    if isinstance(spec, str) and spec.lower() in SHORTHANDS:
        return [(n, m) for n, m in named if isinstance(m, SHORTHANDS[spec.lower()])]
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return [(n, m) for n, m in named if isinstance(m, spec)]
    if isinstance(spec, nn.Module):
        hits = [(n, m) for n, m in named if m is spec][:1]  # a module registered twice: its first name
        if not hits:
            raise DeepCollapseError(f"layers: the {type(spec).__name__} module given is not a submodule of the model")
        return hits
    if isinstance(spec, str):
        some = ", ".join(n.removeprefix(prefix) for n, _ in named[:12])
        raise DeepCollapseError(
            f"layers: {spec!r} matches no module of {type(model).__name__} (names: {some}"
            f"{', ...' if len(named) > 12 else ''}; shorthands: {', '.join(SHORTHANDS)})"
        )
    raise DeepCollapseError(f"layers entries must be names, module types, modules or shorthands, got {spec!r}")


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs selected by ``layers``, in ``model.named_modules()`` order, deduplicated.

    Each entry of ``layers`` is a module name (``"features.3"``), a module object (``model.layer1``), a
    module class (``nn.Conv2d``) or a shorthand ``"linear"``, ``"conv"``, ``"relu"`` (every such module); a
    name that exists wins over a shorthand. A name or module must exist; types and shorthands may match
    nothing as long as something is selected. For a ``DataParallel``/``DistributedDataParallel`` model
    names may omit ``module.`` and results drop it.
    """
    specs = [layers] if isinstance(layers, str | type | nn.Module) else list(layers)
    if not specs:
        raise DeepCollapseError("layers is empty: give module names, modules, module types or 'linear'/'conv'/'relu'")
    named = _named(model)
    chosen: dict[str, nn.Module] = {}
    for spec in specs:
        chosen.update(_module_hits(model, named, spec))
    if not chosen:
        wanted = ", ".join(repr(getattr(s, "__name__", s)) for s in specs)
        raise DeepCollapseError(f"layers: {wanted} match no module of {type(model).__name__}")
    order = {n: i for i, (n, _) in enumerate(named)}
    prefix = _wrapped_prefix(model)
    return [(n.removeprefix(prefix), chosen[n]) for n in sorted(chosen, key=order.__getitem__)]


def _resolve_classifier(model: nn.Module, classifier: Any, num_classes: int) -> tuple[str, nn.Module] | None:
    """``"auto"``: the last ``nn.Linear`` with ``K`` outputs (or none); ``None``: none; else a name or module."""
    if classifier is None:
        return None
    if isinstance(classifier, str) and classifier == "auto":
        fits = [(n, m) for n, m in _named(model) if isinstance(m, nn.Linear) and m.out_features == num_classes]
        prefix = _wrapped_prefix(model)
        return (fits[-1][0].removeprefix(prefix), fits[-1][1]) if fits else None
    if not isinstance(classifier, str | nn.Module):
        raise DeepCollapseError(f"classifier must be 'auto', None, a module name or a module, got {classifier!r}")
    ((name, module),) = resolve_layers(model, classifier)
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != num_classes:
        shape = tuple(w.shape) if isinstance(w, Tensor) else None
        raise DeepCollapseError(
            f"classifier: {name!r} must have a 2-D weight with num_classes={num_classes} rows, got weight shape"
            f" {shape}; name the classifier layer or pass classifier=None"
        )
    return name, module


# -------------------------------------------------------------------------------------- batches


def as_class_labels(labels: Any, num_classes: int, *, name: str = "labels") -> Tensor:
    """Integer class labels (B,) from ``(B,)`` integers, ``(B, 1)`` integers or ``(B, K)`` one-hot rows."""
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.dim() == 2 and y.shape[1] == num_classes:
        hot = ((y == 0) | (y == 1)).all() and bool((y.sum(1) == 1).all())
        if not hot:
            raise DeepCollapseError(
                f"{name}: (batch, {num_classes}) labels must be one-hot rows (soft or multi-label targets"
                " have no class to measure)"
            )
        y = y.argmax(1)
    elif y.dim() != 1:
        raise DeepCollapseError(
            f"{name}: labels must be (batch,) integers, (batch, 1) or (batch, {num_classes}) one-hot, got shape"
            f" {tuple(y.shape)}"
        )
    return check_labels(y, num_classes, name=name)


def _split(batch: Any, i: int, batch_fn: BatchFn | None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one loader batch: a user function, a tuple/list, or a dict with a label key."""
    if batch_fn is not None:
        out = batch_fn(batch)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise DeepCollapseError(f"batch {i}: batch_fn must return (inputs, labels), got {type(out).__name__}")
        return out[0], out[1]
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise DeepCollapseError(
                f"batch {i}: a dict batch needs its labels under one of {list(LABEL_KEYS)}, got keys"
                f" {list(batch)}; or pass batch_fn=lambda b: (inputs, labels)"
            )
        return {k: v for k, v in batch.items() if k != key}, batch[key]  # the rest: keyword arguments
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise DeepCollapseError(
            f"batch {i}: the loader must yield (inputs, labels) pairs, dicts with a label key, or use batch_fn;"
            f" got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        )
    return batch[0], batch[1]


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, list | tuple) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple/list, ``model(**x)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _check_resampling(loader: Any) -> None:
    """Refuse a ``DataLoader`` that shuffles with ``drop_last``: each pass would drop different samples."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    size = getattr(loader, "batch_size", None)
    if not (isinstance(loader, torch.utils.data.DataLoader) and loader.drop_last and size):
        return
    n = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None  # type: ignore[arg-type]
    if isinstance(sampler, torch.utils.data.RandomSampler) and n is not None and n % size:
        raise DeepCollapseError(
            f"loader: a DataLoader with shuffle=True and drop_last=True drops a different {n % size} of its {n}"
            " samples in each pass, so the two passes see different data; use drop_last=False, shuffle=False,"
            " or passes=1"
        )


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Run the body with ``model.train(train)``; restore every module's training flag and every buffer after."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train(train)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag


# ------------------------------------------------------------------------------------------ state


@dataclass
class _Site:
    """One call of one hooked module: its output's accumulator, its input's (2-D weight: NC3), a reference's."""

    module: str
    call: int
    out: ClassAccumulator
    weight: Tensor | None
    inp: ClassAccumulator | None
    bias: bool  # the module has a bias (self-duality: centred means) or not (uncentred)
    ref: ClassAccumulator | None = None  # about a reference's class means: NCC and NC4 (test vs train)
    held: Tensor | None = None  # this batch's features in the last pass, until the predictions are known


@dataclass
class _Head:
    """The classifier: the class means of its input (self-duality) and this batch's predictions (NC4)."""

    name: str
    module: nn.Module
    inp: ClassAccumulator
    pred: Tensor | None = None


def _key_of(row: str) -> tuple[str, int]:
    """``"name#3"`` -> ``("name", 3)``; ``"name"`` -> ``("name", 1)``."""
    base, _, call = row.rpartition("#")
    return (base, int(call)) if base and call.isdigit() else (row, 1)


class DNCProbe:
    """Per-layer deep-neural-collapse metrics of ``model`` on a labelled data loader, streamed.

    Parameters
    ----------
    model : nn.Module
        Any module.
    layers : str, module, module type or a sequence of them
        Module names, module objects, module classes, or the shorthands ``"linear"``, ``"conv"``,
        ``"relu"`` (default ``("linear", "conv", "relu")``); see :func:`resolve_layers`.
    num_classes : int
        ``K >= 2``; labels must lie in ``0..K-1`` and each class needs a sample.
    classifier : "auto", None, str or nn.Module
        The layer whose ``argmax`` is the model's prediction (NC4) and whose weight gives self-duality:
        ``"auto"`` (default) takes the last ``nn.Linear`` with ``K`` outputs, if any.
    passes : 1 or 2
        2 (default): exact two-pass statistics, NCC metrics included. 1: one Welford/Chan pass (``D x D``
        state per layer; NCC metrics only with a ``reference``); for one-shot iterators.
    cov : "auto", "full" or "light"
        Per layer, keep the ``D x D`` ``Σ_W`` or only ``O(K·D)`` state (see :mod:`deepcollapse.measure.accumulate`).
    max_cov_bytes : int
        ``cov="auto"`` keeps ``Σ_W`` while ``8 D²`` bytes fit.
    normalize, weighting, rtol, rank_rtol :
        Metric conventions, passed to :func:`deepcollapse.measure.metrics.dnc_metrics` (``rtol``: the
        pseudo-inverse and rank cutoff; default from the precision of the features as given).
    mode : "eval" or "train"
        The mode the model is measured in (default ``"eval"``; ``"train"`` warns). Flags and buffers are
        restored afterwards either way.
    batch_fn : callable or None
        Maps a loader batch to ``(inputs, labels)``; by default a batch is ``(inputs, labels, ...)`` or a
        dict whose labels sit under one of :data:`LABEL_KEYS` (the other entries are passed as keywords).
    device : torch.device, str or None
        Where inputs are moved; ``None``: the device of the model's first parameter (inputs left alone
        for a model without parameters).

    Labels may be ``(B,)`` integers, ``(B, 1)`` or ``(B, K)`` one-hot. Use :meth:`measure` on a loader,
    or :meth:`update` / :meth:`end_pass` / :meth:`compute` / :meth:`reset` inside your own loop.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(60, 4), torch.arange(60) % 3
    >>> loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 60, 16)]
    >>> res = DNCProbe(model, layers="linear", num_classes=3).measure(loader)
    >>> list(res), "nc4" in res["2"], "nc3_duality" in res["2"]
    (['0', '2'], True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSpec = ("linear", "conv", "relu"),
        num_classes: int,
        classifier: str | nn.Module | None = "auto",
        passes: int = 2,
        cov: Literal["auto", "full", "light"] = "auto",
        max_cov_bytes: int = DEFAULT_MAX_COV_BYTES,
        normalize: bool = True,
        weighting: Weighting = "samples",
        rtol: float | None = None,
        rank_rtol: float = 1e-3,
        mode: Literal["eval", "train"] = "eval",
        batch_fn: BatchFn | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeepCollapseError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in ("eval", "train"):
            raise DeepCollapseError(f"mode must be 'eval' or 'train', got {mode!r}")
        if batch_fn is not None and not callable(batch_fn):
            raise DeepCollapseError(f"batch_fn must be a function batch -> (inputs, labels), got {batch_fn!r}")
        self.model = model
        self.layers = resolve_layers(model, layers)
        # validates num_classes, passes, cov early
        ClassAccumulator(num_classes, passes=passes, cov=cov, max_cov_bytes=max_cov_bytes)
        self.num_classes = num_classes
        self.classifier = _resolve_classifier(model, classifier, num_classes)
        self.options = {"passes": passes, "cov": cov, "max_cov_bytes": max_cov_bytes}
        self.passes = passes
        self.normalize, self.weighting, self.rtol, self.rank_rtol = normalize, weighting, rtol, rank_rtol
        self.mode, self.batch_fn = mode, batch_fn
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.stats: dict[str, ClassStats] = {}
        self.reset()

    @property
    def layer_names(self) -> list[str]:
        """The hooked modules' names (rows are these, with ``#j`` for modules that run several times)."""
        return [n for n, _ in self.layers]

    # ------------------------------------------------------------------------------ streaming API
    def reset(self, *, reference: Mapping[str, ClassStats] | None = None) -> None:
        """Forget all data; ``reference`` (e.g. ``probe.stats`` of a train-set run) gives the NCC class means."""
        self.pass_index = 1
        self._done = False
        self._batch = 0
        self._sites: dict[tuple[str, int], _Site] = {}
        self._order: list[tuple[str, int]] = []
        self._ncalls: dict[str, int] | None = None  # calls per forward, fixed by the first batch
        self._pre: dict[str, int] = {}
        self._post: dict[str, int] = {}
        self._seen: list[Tensor | None] = [None, None]  # label counts per pass (same samples check)
        self._labels: Tensor | None = None
        self._reference = self._parse_reference(reference)
        head = self.classifier
        self._head = (
            None
            if head is None
            else _Head(
                head[0],
                head[1],
                ClassAccumulator(
                    self.num_classes, name=f"classifier {head[0]!r} (input)", passes=2, cov="light", ncc=False
                ),
            )
        )

    def update(self, inputs: Any, labels: Any = None) -> None:
        """Run one batch through the model with the hooks attached: ``update(batch)`` splits a loader
        batch (see ``batch_fn``), ``update(inputs, labels)`` takes them apart."""
        with preserved_state(self.model, train=self.mode == "train"):
            self._warn_train()
            self._forward(inputs, labels)

    def end_pass(self) -> None:
        """Close the current pass over the data (summing over DDP ranks); after pass 1 the means are fixed."""
        if self._done:
            raise DeepCollapseError(f"all {self.passes} pass(es) are finished; call reset() to measure again")
        if _dist_ready():
            self._agree_layout()
        elif not self._sites:
            raise DeepCollapseError(f"the loader yielded no batches (pass {self.pass_index} of {self.passes})")
        self._check_same_samples(final=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._end_accumulators()
        for message in dict.fromkeys(str(w.message).split(": ", 1)[-1] for w in caught):
            warnings.warn(f"every layer: {message}", stacklevel=2)  # once, not once per accumulator
        if self.pass_index == self.passes:
            self._done = True
            return
        self.pass_index += 1
        self._batch = 0

    def _end_accumulators(self) -> None:
        for site in self._sites.values():
            site.out.end_pass()
            if site.inp is not None and self.pass_index == 1:
                site.inp.end_pass()
            if site.ref is not None and self.pass_index == self.passes:
                site.ref.end_pass()
        if self._head is not None and self.pass_index == 1:
            self._head.inp.end_pass()

    def compute(self) -> dict[str, dict[str, float]]:
        """``{row: {metric: value}}`` in forward order, after the last :meth:`end_pass`; fills :attr:`stats`."""
        if not self._done:
            raise DeepCollapseError(
                f"compute() before the end of pass {self.pass_index} of {self.passes}; call end_pass()"
            )
        results: dict[str, dict[str, float]] = {}
        self.stats = {}
        for key in self._order:
            site = self._sites[key]
            row = self._row(key)
            self.stats[row] = site.out.compute()
            results[row] = self._metrics(site, self.stats[row])
        if self._head is not None:
            has_bias = getattr(self._head.module, "bias", None) is not None
            weight_metrics = self._weight_metrics(self._head.module.weight, self._head.inp, bias=has_bias)
            results.setdefault(self._head.name, {}).update(weight_metrics)
        return results

    def measure(
        self, loader: Iterable[Any], *, reference: Mapping[str, ClassStats] | None = None
    ) -> dict[str, dict[str, float]]:
        """Stream ``loader`` (``passes`` times) and return ``{row: {metric: value}}`` in forward order.

        ``reference``: class statistics of another set (``probe.stats`` after measuring the train set);
        ``ncc_accuracy`` and ``nc4`` then use its class means (Galanti et al.'s test-set protocol).
        The per-row :class:`~deepcollapse.measure.metrics.ClassStats` are kept in :attr:`stats`.
        """
        if self.passes == 2 and isinstance(loader, Iterator):
            raise DeepCollapseError(
                "loader is a one-shot iterator but passes=2 streams the data twice; pass a re-iterable"
                " (a DataLoader, a list) or use passes=1"
            )
        if self.passes == 2:
            _check_resampling(loader)
        self.reset(reference=reference)
        with preserved_state(self.model, train=self.mode == "train"):
            self._warn_train()
            for _ in range(self.passes):
                for batch in loader:
                    self._forward(batch)
                self.end_pass()
        return self.compute()

    __call__ = measure

    # ----------------------------------------------------------------------------------- one batch
    def _warn_train(self) -> None:
        if self.mode == "train":
            warnings.warn(
                "DNCProbe(mode='train') measures with dropout active and BatchNorm on batch statistics: the passes"
                " see different features, so the metrics are noisy; BatchNorm running statistics are restored"
                " afterwards",
                stacklevel=3,
            )

    def _forward(self, batch: Any, labels: Any = None) -> None:
        if self._done:
            raise DeepCollapseError(f"all {self.passes} pass(es) are finished; call reset() to measure again")
        i = self._batch
        inputs, raw = _split(batch, i, self.batch_fn) if labels is None else (batch, labels)
        y = as_class_labels(raw, self.num_classes, name=f"batch {i}: labels")
        self._labels = _to_device(y, self.device)
        self._count_labels(y)
        self._pre, self._post = dict.fromkeys(self.layer_names, 0), dict.fromkeys(self.layer_names, 0)
        if self._head is not None:
            self._head.pred = None
        with contextlib.ExitStack() as stack:
            for name, module in self.layers:
                stack.enter_context(module.register_forward_pre_hook(self._pre_hook(name)))
                stack.enter_context(module.register_forward_hook(self._post_hook(name)))
            if self._head is not None:
                stack.enter_context(self._head.module.register_forward_hook(self._head_hook))
            with torch.no_grad():
                _call(self.model, _to_device(inputs, self.device))
        self._end_batch()

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._pre[name] += 1
            key = (name, self._pre[name])
            if key in self._sites:
                return
            if self._ncalls is not None:
                raise DeepCollapseError(
                    f"layer {name!r} ran {self._pre[name]} times in the forward pass of batch {self._batch} but"
                    f" {self._ncalls[name]} times in the first batch; the calls of a module must not vary"
                )
            self._sites[key] = self._new_site(name, key[1], module)
            self._order.append(key)

        return hook

    def _new_site(self, name: str, call: int, module: nn.Module) -> _Site:
        where = f"layer {name!r}" + (f" call {call}" if call > 1 else "")
        w = getattr(module, "weight", None)
        weight = w if isinstance(w, Tensor) and w.dim() == 2 else None
        k, bias = self.num_classes, getattr(module, "bias", None) is not None
        inp = None if weight is None else ClassAccumulator(k, name=f"{where} (input)", passes=2, cov="light", ncc=False)
        out = ClassAccumulator(k, name=where, ncc=self._reference is None, **self.options)
        ref = None
        if self._reference is not None:  # NCC and NC4 about the reference's class means (one pass)
            means = self._reference_for(name, call)
            ref = ClassAccumulator(  # samples of classes the reference lacks are left out of NCC and NC4
                k, name=f"{where} (reference means)", means=means, classes=means.class_ids, cov=self.options["cov"]
            )
        return _Site(name, call, out, weight, inp, bias, ref)

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._post[name] += 1
            site = self._sites[(name, self._post[name])]
            out = _first_tensor(output)
            if out is None:
                raise DeepCollapseError(f"layer {name!r}: output holds no tensor (batch {self._batch})")
            if self.pass_index == self.passes and (self._head is not None or site.ref is not None):
                site.held = out.detach().clone()  # fed after the forward, with the classifier's predictions
            else:
                site.out.update(out, self._labels, batch=self._batch)
            if site.inp is not None and self.pass_index == 1:
                self._update_input(site, args)

        return hook

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        head, k = self._head, self.num_classes
        assert head is not None
        out = _first_tensor(output)
        if out is None or out.dim() != 2 or out.shape[1] != k:
            shape = None if out is None else tuple(out.shape)
            raise DeepCollapseError(f"classifier {head.name!r}: output must be (batch, {k}) scores, got {shape}")
        head.pred = out.detach().argmax(1)
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if self.pass_index == 1 and x is not None:
            head.inp.update(x, self._labels, batch=self._batch)

    def _update_input(self, site: _Site, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        assert site.weight is not None and site.inp is not None
        d_in = site.weight.shape[1]
        if x is None or not x.is_floating_point() or x.dim() < 2 or x[0].numel() != d_in:
            site.inp = None  # NC3 undefined here (see the module docstring)
            return
        site.inp.update(x, self._labels, batch=self._batch)

    def _end_batch(self) -> None:
        if self._ncalls is None:
            self._ncalls = dict(self._pre)
        for name, n in self._ncalls.items():
            if n == 0:
                raise DeepCollapseError(
                    f"layer {name!r} was not called in the forward pass of batch {self._batch};"
                    " choose modules that the model's forward uses"
                )
            if self._post[name] != n:
                raise DeepCollapseError(
                    f"layer {name!r} ran {self._post[name]} times in the forward pass of batch {self._batch} but"
                    f" {n} times in the first batch; the calls of a module must not vary"
                )
        self._feed_held()
        self._batch += 1

    def _feed_held(self) -> None:
        """Feed the last pass's features held during the forward, with the classifier's predictions (NC4)."""
        head = self._head
        if head is not None and head.pred is None and self.pass_index == self.passes:
            raise DeepCollapseError(
                f"classifier {head.name!r} was not called in the forward pass of batch {self._batch}"
            )
        pred = None if head is None else head.pred
        for site in self._sites.values():
            if site.held is None:
                continue
            own = pred if site.ref is None else None
            site.out.update(site.held, self._labels, predictions=own, batch=self._batch)
            if site.ref is not None:
                site.ref.update(site.held, self._labels, predictions=pred, batch=self._batch)
            site.held = None

    # --------------------------------------------------------------------------- same samples, DDP
    def _count_labels(self, y: Tensor) -> None:
        p = self.pass_index - 1
        counts = torch.bincount(y.cpu(), minlength=self.num_classes)
        self._seen[p] = counts if self._seen[p] is None else self._seen[p] + counts
        if p == 1:
            self._check_same_samples(final=False)

    def _check_same_samples(self, *, final: bool) -> None:
        """Pass 2 must see the samples of pass 1: stop as soon as a class has more, or at the end if fewer."""
        if self.pass_index != 2:
            return
        zero = torch.zeros(self.num_classes, dtype=torch.int64)
        first, second = (zero if s is None else s for s in self._seen)
        bad = (second != first) if final else (second > first)
        if bool(bad.any()):
            c = int(bad.nonzero()[0])
            raise DeepCollapseError(
                f"loader: pass 2 yielded {int(second[c])} samples of class {c}{'' if final else ' so far'}, pass 1"
                f" {int(first[c])}; the two passes must see the same samples (a loader that shuffles with"
                " drop_last, a sampler that draws with replacement, or a stream that changes), or use passes=1"
            )

    def _agree_layout(self) -> None:
        """Under DDP, give every rank the same rows (a rank without batches creates them), before any reduction."""
        if self.pass_index != 1:
            return
        layout = [(n, c, self._sites[(n, c)].inp is not None) for n, c in self._order]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, layout)
        full = [g for g in gathered if g]
        if not full:
            raise DeepCollapseError("the loader yielded no batches on any rank (pass 1)")
        rows = [(n, c) for n, c, _ in full[0]]
        if any([(n, c) for n, c, _ in g] != rows for g in full):
            raise DeepCollapseError("DDP ranks ran different layer calls per forward; the model must be the same")
        if not self._sites:
            modules = dict(self.layers)
            for n, c in rows:
                self._sites[(n, c)] = self._new_site(n, c, modules[n])
            self._order = rows
            self._ncalls = {n: max(c for m, c in rows if m == n) for n, _ in self.layers}
        for i, key in enumerate(rows):
            if not all(g[i][2] for g in full):
                self._sites[key].inp = None

    # --------------------------------------------------------------------------------------- metrics
    def _row(self, key: tuple[str, int]) -> str:
        assert self._ncalls is not None
        return key[0] if self._ncalls[key[0]] == 1 else f"{key[0]}#{key[1]}"

    def _parse_reference(self, reference: Mapping[str, ClassStats] | None) -> dict[tuple[str, int], ClassStats] | None:
        if reference is None:
            return None
        if not isinstance(reference, Mapping) or not all(isinstance(s, ClassStats) for s in reference.values()):
            raise DeepCollapseError("reference must map row names to ClassStats, e.g. probe.stats of a train-set run")
        for row, s in reference.items():
            if max(s.class_ids) >= self.num_classes:
                raise DeepCollapseError(
                    f"reference[{row!r}] has labels up to {max(s.class_ids)}, num_classes={self.num_classes}"
                )
        return {_key_of(row): s for row, s in reference.items()}

    def _reference_for(self, name: str, call: int) -> ClassStats:
        assert self._reference is not None
        stats = self._reference.get((name, call))
        if stats is None:
            where = name + (f" (call {call})" if call > 1 else "")
            raise DeepCollapseError(f"reference has no statistics for layer {where}; measure the same layers")
        return stats

    def _metrics(self, site: _Site, stats: ClassStats) -> dict[str, float]:
        opts = {"normalize": self.normalize, "weighting": self.weighting, "rtol": self.rtol}
        m: dict[str, float] = dict(dnc_metrics(stats, rank_rtol=self.rank_rtol, **opts))
        if site.ref is not None:
            against = site.ref.compute()
            m["ncc_accuracy"] = ncc_accuracy(against)
            if against.nc4_disagree is not None:
                m["nc4"] = nc4(against)
        if site.weight is not None and site.inp is not None:
            m |= self._weight_metrics(site.weight, site.inp, bias=site.bias)
        m["dim"] = float(stats.dim)
        m["samples"] = float(stats.total)
        return m

    def _weight_metrics(self, weight: Tensor, inp: ClassAccumulator, *, bias: bool) -> dict[str, float]:
        """NC3 of a weight with the class means of its input: ``nc3_span``; for a classifier (``K`` rows, those
        of the classes present) Papyan's self-duality (``nc3_duality``, uncentred without a bias) and ``nc3_zhu``."""
        stats = _means_stats(inp)
        out = {"nc3_span": nc3_span(weight, stats, rtol=self.rtol)}
        if weight.shape[0] == self.num_classes:
            w = weight.detach()[torch.tensor(stats.class_ids, device=weight.device)]
            key = "nc3_duality" if bias else "nc3_duality_uncentred"
            out[key] = nc3_duality(w, stats, center=bias, weighting=self.weighting)
            out["nc3_zhu"] = nc3_zhu(w, stats, weighting=self.weighting)
        return out


def _means_stats(acc: ClassAccumulator) -> ClassStats:
    """A means-only ``ClassStats`` (NC3 reads counts, means, precision and classes) after an accumulator's pass 1."""
    means = acc.means
    kept = acc._kept if acc._kept is not None else list(range(means.shape[0]))
    classes = None if kept == list(range(acc.num_classes)) else torch.tensor(kept)
    zeros = means.new_zeros(means.shape[0])
    return ClassStats(acc.counts.to(means.device), means, zeros, None, eps=acc.eps or EPS64, classes=classes)
