r"""Measure deep neural collapse in any PyTorch model: a streaming per-layer probe.

:class:`DNCProbe` attaches forward hooks to chosen modules, flattens each module's output per sample to
``h_i`` (``D`` = product of the non-batch dimensions), streams a data loader through the model under
``torch.no_grad()`` and feeds :class:`~deepcollapse.measure.accumulate.ClassAccumulator` (float64, on the features'
device). The metrics come from :func:`deepcollapse.metrics.dnc_metrics` and
:func:`deepcollapse.metrics.nc3`; nothing is re-derived here.

What is measured per layer ``l`` (module output ``h^l``):

* ``nc1``, ``nc2_etf``, ``nc2_orth``, ``equinorm``, ``nc4`` (nearest-class-centre accuracy, two passes
  only), ``cdnv``, ``rank``/``rank_centred`` (numerical rank of the class means), ``mean_norm``,
  plus ``dim`` (``D``) and ``samples`` (``N``).
* ``nc3`` for a module with a 2-D ``weight`` ``W`` (out, D_in) -- ``nn.Linear`` and look-alikes. ``W`` acts
  on the features that *enter* the layer, so NC3 pairs ``W`` with the class means of the module's
  **input** ``h^{l-1}`` (the probe records the input's class sums for such modules: O(K·D_in) extra
  state), not with the means of its output. ``nc3`` is the projection form ``||W (I - P_M)||_F/||W||_F``;
  when ``W`` has ``K`` rows (a classifier) ``nc3_duality`` is Papyan's self-duality distance to the
  centred input means. Convolutions (4-D weights act on patches, not on the flattened map) and modules
  whose flattened input does not have ``D_in`` features are skipped: no ``nc3`` key.

The model's mode (train/eval) is left as the caller set it; its return value (tensor, tuple, dict) is
ignored. With two passes (default) the loader is iterated twice and must yield the same samples both times
(shuffling is fine; random augmentation or dropout in train mode make the passes disagree slightly; a
different per-class count is an error). Hooks are removed when a pass ends, also after an error.

Under DDP, run the probe unchanged on every rank with its shard of the data (e.g. a ``DistributedSampler``):
each pass ends with a sum all-reduce of the statistics, so every rank returns the metrics of the full data.
Every rank must see at least one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deepcollapse._validate import DeepCollapseError, check_labels
from deepcollapse.measure.accumulate import DEFAULT_MAX_COV_BYTES, ClassAccumulator
from deepcollapse.measure.metrics import ClassStats, Weighting, dnc_metrics, nc3

__all__ = ["SHORTHANDS", "DNCProbe", "resolve_layers"]

SHORTHANDS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "relu": (nn.ReLU,),
}

LayerSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]


def _wrapped_prefix(model: nn.Module) -> str:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return "module." if isinstance(model, wrappers) else ""


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs selected by ``layers``, in ``model.named_modules()`` order, deduplicated.

    Each entry of ``layers`` is a module name (``"features.3"``), a module class (``nn.Conv2d``) or a
    shorthand ``"linear"``, ``"conv"``, ``"relu"`` (every such module); a name that exists wins over a
    shorthand. A name must exist; types and shorthands may match nothing as long as something is selected.
    For a ``DataParallel``/``DistributedDataParallel`` model names may omit ``module.`` and
    results drop it.
    """
    specs = [layers] if isinstance(layers, str | type) else list(layers)
    if not specs:
        raise DeepCollapseError("layers is empty: give module names, module types or 'linear'/'conv'/'relu'")
    prefix = _wrapped_prefix(model)
    named = [(n, m) for n, m in model.named_modules() if n and n != prefix.rstrip(".")]
    by_name = dict(named)
    chosen: dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, str) and (spec in by_name or prefix + spec in by_name):
            key = spec if spec in by_name else prefix + spec
            hits = [(key, by_name[key])]
        elif isinstance(spec, str) and spec.lower() in SHORTHANDS:
            hits = [(n, m) for n, m in named if isinstance(m, SHORTHANDS[spec.lower()])]
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [(n, m) for n, m in named if isinstance(m, spec)]
        elif isinstance(spec, str):
            some = ", ".join(n.removeprefix(prefix) for n, _ in named[:12])
            raise DeepCollapseError(
                f"layers: {spec!r} matches no module of {type(model).__name__} (names: {some}"
                f"{', ...' if len(named) > 12 else ''}; shorthands: {', '.join(SHORTHANDS)})"
            )
        else:
            raise DeepCollapseError(f"layers entries must be names, module types or shorthands, got {spec!r}")
        chosen.update(hits)
    if not chosen:
        wanted = ", ".join(repr(getattr(s, "__name__", s)) for s in specs)
        raise DeepCollapseError(f"layers: {wanted} match no module of {type(model).__name__}")
    order = {n: i for i, (n, _) in enumerate(named)}
    return [(n.removeprefix(prefix), chosen[n]) for n in sorted(chosen, key=order.__getitem__)]


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


def _nc3_weight(module: nn.Module) -> Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


class _Layer:
    """One hooked module: its output accumulator and, for NC3, the class sums of its input."""

    def __init__(self, name: str, module: nn.Module, num_classes: int, options: dict[str, Any]) -> None:
        self.name, self.module = name, module
        self.out = ClassAccumulator(num_classes, name=f"layer {name!r}", **options)
        self.weight = _nc3_weight(module)
        self.inp = (
            ClassAccumulator(num_classes, name=f"layer {name!r} (input)", passes=2, cov="light", ncc=False)
            if self.weight is not None
            else None
        )
        self.calls = 0


class DNCProbe:
    """Per-layer deep-neural-collapse metrics of ``model`` on a labelled data loader, streamed.

    Parameters
    ----------
    model : nn.Module
        Any module; its train/eval mode is used as set.
    layers : str, module type or a sequence of them
        Module names, module classes, or the shorthands ``"linear"``, ``"conv"``, ``"relu"`` (default
        ``("linear", "conv", "relu")``); see :func:`resolve_layers`.
    num_classes : int
        ``K >= 2``; labels must lie in ``0..K-1`` and each class needs a sample.
    passes : 1 or 2
        2 (default): exact two-pass statistics, NC4 included. 1: one Welford/Chan pass (needs ``D x D``
        state per layer, no NC4); for one-shot iterators.
    cov : "auto", "full" or "light"
        Per layer, keep the ``D x D`` ``Σ_W`` or only ``O(K·D)`` state (see :mod:`deepcollapse.measure.accumulate`).
    max_cov_bytes : int
        ``cov="auto"`` keeps ``Σ_W`` while ``8 D²`` bytes fit.
    normalize, weighting, rank_rtol :
        Metric conventions, passed to :func:`deepcollapse.metrics.dnc_metrics`.
    device : torch.device, str or None
        Where inputs are moved; ``None``: the device of the model's first parameter (inputs left alone
        for a model without parameters).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(60, 4), torch.arange(60) % 3
    >>> loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 60, 16)]
    >>> res = DNCProbe(model, layers="linear", num_classes=3).measure(loader)
    >>> list(res), sorted(res["2"])[:4]
    (['0', '2'], ['cdnv', 'dim', 'equinorm', 'mean_norm'])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSpec = ("linear", "conv", "relu"),
        num_classes: int,
        passes: int = 2,
        cov: Literal["auto", "full", "light"] = "auto",
        max_cov_bytes: int = DEFAULT_MAX_COV_BYTES,
        normalize: bool = True,
        weighting: Weighting = "samples",
        rank_rtol: float = 1e-3,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeepCollapseError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers = resolve_layers(model, layers)
        # validates num_classes, passes, cov early
        ClassAccumulator(num_classes, passes=passes, cov=cov, max_cov_bytes=max_cov_bytes)
        self.num_classes = num_classes
        self.options = {"passes": passes, "cov": cov, "max_cov_bytes": max_cov_bytes}
        self.passes = passes
        self.normalize, self.weighting, self.rank_rtol = normalize, weighting, rank_rtol
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.stats: dict[str, ClassStats] = {}

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    # -- hooks
    def _hook(self, layer: _Layer, ctx: dict[str, Any]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            layer.calls += 1
            if layer.calls > 1:
                raise DeepCollapseError(
                    f"layer {layer.name!r} ran more than once in the forward pass of batch {ctx['batch']};"
                    " hook a module that is called once per forward"
                )
            out = _first_tensor(output)
            if out is None:
                raise DeepCollapseError(f"layer {layer.name!r}: output holds no tensor (batch {ctx['batch']})")
            layer.out.update(out, ctx["labels"], batch=ctx["batch"])
            if layer.inp is not None and layer.inp.pass_index == 1 and ctx["pass"] == 1:
                self._update_input(layer, args, ctx)

        return hook

    def _update_input(self, layer: _Layer, args: tuple[Any, ...], ctx: dict[str, Any]) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        assert layer.weight is not None and layer.inp is not None
        d_in = layer.weight.shape[1]
        if x is None or not x.is_floating_point() or x.dim() < 2 or x[0].numel() != d_in:
            layer.inp = None  # NC3 undefined here (see the module docstring)
            return
        layer.inp.update(x, ctx["labels"], batch=ctx["batch"])

    def _run_pass(self, loader: Iterable[Any], layers: list[_Layer], pass_no: int, order: list[str]) -> int:
        """One pass over ``loader`` with hooks attached (removed on exit, also after an error).

        On pass 1, forward pre-hooks append each layer to ``order`` when it first starts (forward depth).
        """
        ctx: dict[str, Any] = {"pass": pass_no, "batch": -1, "labels": None}
        n = 0
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.enter_context(layer.module.register_forward_hook(self._hook(layer, ctx)))
                if pass_no == 1:

                    def pre(module: nn.Module, args: Any, name: str = layer.name) -> None:
                        if name not in order:
                            order.append(name)

                    stack.enter_context(layer.module.register_forward_pre_hook(pre))
            for i, batch in enumerate(loader):
                inputs, labels = self._split(batch, i)
                ctx["batch"], ctx["labels"] = i, _to_device(labels, self.device)
                for layer in layers:
                    layer.calls = 0
                with torch.no_grad():
                    _call(self.model, _to_device(inputs, self.device))
                for layer in layers:
                    if layer.calls == 0:
                        raise DeepCollapseError(
                            f"layer {layer.name!r} was not called in the forward pass of batch {i};"
                            " choose modules that the model's forward uses"
                        )
                n += 1
        return n

    def _split(self, batch: Any, i: int) -> tuple[Any, Tensor]:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise DeepCollapseError(
                f"batch {i}: the loader must yield (inputs, labels) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
            )
        labels = batch[1] if isinstance(batch[1], Tensor) else torch.as_tensor(batch[1])
        return batch[0], check_labels(labels, self.num_classes, name=f"batch {i}: labels")

    # -- public
    def measure(self, loader: Iterable[Any]) -> dict[str, dict[str, float]]:
        """Stream ``loader`` (``passes`` times) and return ``{layer name: {metric: value}}`` in forward order.

        The per-layer :class:`~deepcollapse.metrics.ClassStats` are kept in :attr:`stats`.
        """
        if self.passes == 2 and isinstance(loader, Iterator):
            raise DeepCollapseError(
                "loader is a one-shot iterator but passes=2 streams the data twice; pass a re-iterable"
                " (a DataLoader, a list) or use passes=1"
            )
        layers = [_Layer(n, m, self.num_classes, self.options) for n, m in self.layers]
        order: list[str] = []
        for pass_no in range(1, self.passes + 1):
            if self._run_pass(loader, layers, pass_no, order) == 0:
                raise DeepCollapseError(f"the loader yielded no batches (pass {pass_no} of {self.passes})")
            for layer in layers:
                layer.out.end_pass()
                if layer.inp is not None and layer.inp.pass_index == 1:
                    layer.inp.end_pass()
        results: dict[str, dict[str, float]] = {}
        self.stats = {}
        for layer in sorted(layers, key=lambda x: order.index(x.name)):
            stats = layer.out.compute()
            self.stats[layer.name] = stats
            results[layer.name] = self._metrics(layer, stats)
        return results

    __call__ = measure

    def _metrics(self, layer: _Layer, stats: ClassStats) -> dict[str, float]:
        m = dnc_metrics(stats, normalize=self.normalize, weighting=self.weighting, rank_rtol=self.rank_rtol)
        if layer.weight is not None and layer.inp is not None:
            means = layer.inp.means
            k = self.num_classes
            zeros = means.new_zeros(k)  # a means-only ClassStats: NC3 reads counts and means
            inp = ClassStats(layer.inp.counts.to(means.device), means, zeros, means.new_zeros(k, k))
            m["nc3"] = nc3(layer.weight, inp)
            if layer.weight.shape[0] == k:
                m["nc3_duality"] = nc3(layer.weight, inp, method="duality", center=True, weighting=self.weighting)
        m["dim"] = float(stats.dim)
        m["samples"] = float(stats.total)
        return m
