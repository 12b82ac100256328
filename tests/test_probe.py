"""DNCProbe: per-layer metrics of real small models equal a direct numpy computation, in any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepcollapse import DNCProbe
from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.probe import resolve_layers
from reference import np_dnc

K = 10


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- data and reference


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """400 sklearn digits (8x8, 10 classes), standardized, float64."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return torch.tensor(x[:400]), torch.tensor(y[:400])


def loader(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, K)).double()


def cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 24),
        nn.ReLU(),
        nn.Linear(24, K),
    ).double()


METRIC_KEYS = ("nc1", "nc2_etf", "nc2_orth", "nc4", "cdnv", "rank", "dim", "nc3", "nc3_duality")


def np_metrics(h: np.ndarray, y: np.ndarray, k: int, weight: np.ndarray | None, inp: np.ndarray | None) -> dict:
    """The metrics the probe reports, from the shared numpy reference on all features at once."""
    ref = np_dnc(h, y, k, weight=weight, inp=inp)
    return {key: ref[key] for key in METRIC_KEYS if key in ref}


def reference(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Metrics of every module of a Sequential from its full-data intermediate outputs."""
    out: dict[str, dict] = {}
    h = x
    with torch.no_grad():
        for i, module in enumerate(model):
            inp, h = h, module(h)
            w = module.weight.numpy() if isinstance(module, nn.Linear) else None
            out[str(i)] = np_metrics(h.numpy(), y.numpy(), K, w, inp.numpy())
    return out


def assert_matches(res: dict, ref: dict, *, rel: float = 1e-8) -> None:
    for name, metrics in res.items():
        for key, value in ref[name].items():
            assert metrics[key] == pytest.approx(value, rel=rel, abs=1e-12), (name, key)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("size", [1, 37, 400])
def test_mlp_matches_numpy_in_any_batch_size(digits, size: int) -> None:
    x, y = digits
    model = mlp()
    res = DNCProbe(model, layers=("linear", "relu"), num_classes=K).measure(loader(x, y, size))
    assert list(res) == ["0", "1", "2", "3", "4"]
    assert "nc3" in res["0"] and "nc3_duality" in res["4"] and "nc3" not in res["1"]
    assert_matches(res, reference(model, x, y))
    assert no_hooks(model)


@pytest.mark.parametrize("size", [29, 400])
def test_cnn_matches_numpy(digits, size: int) -> None:
    x, y = digits
    model = cnn()
    probe = DNCProbe(model, layers=[nn.Conv2d, "relu", "3", "linear"], num_classes=K, cov="light")
    res = probe.measure(loader(x, y, size))
    assert list(res) == ["1", "2", "3", "5", "6", "7"]
    assert res["1"]["dim"] == 4 * 6 * 6 and "nc3" not in res["1"]  # conv weights: no NC3
    assert_matches(res, reference(model, x, y))
    assert probe.stats["1"].sigma_w is None


def test_one_pass_matches_two_passes_without_nc4(digits) -> None:
    x, y = digits
    model = mlp()
    two = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 64))
    one = DNCProbe(model, layers="relu", num_classes=K, passes=1).measure(iter(loader(x, y, 64)))
    for name in two:
        assert "nc4" not in one[name]
        for key in ("nc1", "nc2_etf", "nc2_orth", "cdnv"):
            assert one[name][key] == pytest.approx(two[name][key], rel=1e-9)


def test_float32_model_gives_float64_statistics(digits) -> None:
    x, y = digits
    model = mlp().float()
    probe = DNCProbe(model, layers="linear", num_classes=K)
    res = probe.measure(loader(x.float(), y, 50))
    assert probe.stats["4"].means.dtype == torch.float64
    ref = reference(model, x.float(), y)
    assert_matches(res, {n: {k: v for k, v in r.items() if k != "nc4"} for n, r in ref.items()}, rel=1e-4)


def test_planted_collapse_through_identity() -> None:
    k, d = 4, 6
    means = torch.zeros(k, d, dtype=torch.float64)
    means[:, :k] = torch.eye(k) - 1.0 / k  # simplex ETF
    y = torch.arange(120) % k
    x = means[y] + 1e-7 * torch.randn(120, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Identity())
    res = DNCProbe(model, layers="0", num_classes=k).measure(loader(x, y, 25))
    assert res["0"]["nc1"] < 1e-10 and res["0"]["nc2_etf"] < 1e-6 and res["0"]["nc4"] == 1.0


# ------------------------------------------------------------------------------- model interfaces


class TupleNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(64, 12)
        self.rnn = nn.GRU(12, 8, batch_first=True)  # a module whose output is a tuple
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor, scale: float = 1.0):
        z = torch.relu(self.body(x * scale))
        seq, _ = self.rnn(z[:, None, :])
        logits = self.head(seq[:, 0])
        return (logits, z) if self.kind == "tuple" else {"logits": logits, "z": z}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_models_returning_tuples_or_dicts(digits, kind: str) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = TupleNet(kind).double()
    res = DNCProbe(model, layers=["body", "rnn", "head"], num_classes=K).measure(loader(x, y, 100))
    assert list(res) == ["body", "rnn", "head"] and res["rnn"]["dim"] == 8
    with torch.no_grad():
        logits = model(x)[0 if kind == "tuple" else "logits"]
    ref = np_metrics(logits.numpy(), y.numpy(), K, None, None)
    assert res["head"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)
    # inputs as a mapping are passed as keyword arguments
    kw = [({"x": a, "scale": 1.0}, b) for a, b in loader(x, y, 100)]
    res_kw = DNCProbe(model, layers="head", num_classes=K).measure(kw)
    assert res_kw["head"]["nc1"] == pytest.approx(ref["nc1"], rel=1e-8)


def test_train_and_eval_modes_are_left_alone(digits) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, K)).double()
    model.eval()
    a = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 40))
    b = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 400))
    assert not model.training and a["2"]["nc1"] == pytest.approx(b["2"]["nc1"], rel=1e-8)
    model.train()
    DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 40))
    assert model.training and all(m.training for m in model.modules())


def test_layer_selection() -> None:
    model = cnn()
    names = lambda spec: [n for n, _ in resolve_layers(model, spec)]  # noqa: E731
    assert names("linear") == ["5", "7"]
    assert names("conv") == ["1"]
    assert names(nn.ReLU) == ["2", "6"]
    assert names(["7", "relu", "7"]) == ["2", "6", "7"]
    assert names(("linear", "conv", "relu")) == ["1", "2", "5", "6", "7"]
    with pytest.raises(DeepCollapseError, match=r"layers: 'fc9' matches no module of Sequential \(names: 0, 1"):
        resolve_layers(model, ["linear", "fc9"])
    with pytest.raises(DeepCollapseError, match="match no module"):
        resolve_layers(nn.Sequential(nn.Linear(2, 2)), "conv")
    with pytest.raises(DeepCollapseError, match="layers is empty"):
        resolve_layers(model, [])


# ------------------------------------------------------------------------------ hooks and errors


class Exploding:
    """A loader that fails after two batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x[:10], self.y[:10]
        yield self.x[10:20], self.y[10:20]
        raise RuntimeError("disk on fire")


def test_hooks_removed_after_success_and_errors(digits) -> None:
    x, y = digits
    model = mlp()
    probe = DNCProbe(model, layers=("linear", "relu"), num_classes=K)
    probe.measure(loader(x, y, 100))
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        probe.measure(Exploding(x, y))
    assert no_hooks(model)
    bad = x.clone()
    bad[130, 5] = float("nan")
    with pytest.raises(DeepCollapseError, match=r"layer '0', batch 2: features contains NaN or inf"):
        probe.measure(loader(bad, y, 50))
    assert no_hooks(model)
    yy = y.clone()
    yy[77] = 12
    with pytest.raises(DeepCollapseError, match=r"batch 1: labels must lie in 0\.\.9 .*found 12"):
        probe.measure(loader(x, yy, 50))
    assert no_hooks(model)


def test_bad_input_messages(digits) -> None:
    x, y = digits
    model = mlp()
    probe = DNCProbe(model, layers="linear", num_classes=K)
    with pytest.raises(DeepCollapseError, match=r"the loader yielded no batches \(pass 1 of 2\)"):
        probe.measure([])
    with pytest.raises(DeepCollapseError, match="one-shot iterator"):
        probe.measure(iter(loader(x, y, 100)))
    few = y.clone()
    few[few == 7] = 3
    with pytest.raises(DeepCollapseError, match=r"layer '0': class\(es\) \[7\] have no samples"):
        probe.measure(loader(x, few, 100))
    with pytest.raises(DeepCollapseError, match="must yield \\(inputs, labels\\) pairs, got Tensor"):
        probe.measure([x[:10]])
    with pytest.raises(DeepCollapseError, match="num_classes must be an integer >= 2"):
        DNCProbe(model, layers="linear", num_classes=1)
    with pytest.raises(DeepCollapseError, match=r"model must be a torch\.nn\.Module"):
        DNCProbe(lambda t: t, num_classes=3)  # type: ignore[arg-type]
    assert no_hooks(model)


def test_shape_change_between_batches() -> None:
    model = nn.Sequential(nn.Flatten())
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), (torch.randn(4, 5), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(DeepCollapseError, match=r"layer '0', batch 1: 5 features per sample .* earlier batches had 3"):
        DNCProbe(model, layers="0", num_classes=2).measure(data)
    assert no_hooks(model)


def test_module_called_twice_or_never() -> None:
    act = nn.ReLU()
    twice = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    data = [(torch.randn(6, 3), torch.arange(6) % 2)]
    with pytest.raises(DeepCollapseError, match="layer '1' ran more than once in the forward pass of batch 0"):
        DNCProbe(twice, layers="1", num_classes=2).measure(data)
    assert no_hooks(twice)

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(DeepCollapseError, match="layer 'unused' was not called in the forward pass of batch 0"):
        DNCProbe(Skips(), layers="linear", num_classes=2).measure(data)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_matches_cpu(digits) -> None:
    x, y = digits
    model = cnn()
    cpu = DNCProbe(model, layers=("conv", "linear"), num_classes=K).measure(loader(x, y, 64))
    probe = DNCProbe(model.cuda(), layers=("conv", "linear"), num_classes=K)
    gpu = probe.measure(loader(x, y, 64))  # inputs moved to the model's device
    assert probe.stats["7"].means.device.type == "cuda"
    for name in cpu:
        for key in ("nc1", "nc2_etf", "nc3", "cdnv"):
            if key in cpu[name]:
                assert gpu[name][key] == pytest.approx(cpu[name][key], rel=1e-7), (name, key)
