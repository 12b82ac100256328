"""DNCProbe: per-layer metrics of real small models equal a direct numpy computation, in any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepcollapse import DNCProbe
from deepcollapse._validate import DeepCollapseError
from deepcollapse.measure.probe import resolve_layers
from deepcollapse.measure.stats import RTOL_FACTOR
from reference import np_conventions

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


METRIC_KEYS = ("nc1", "nc1_quotient", "nc2_etf", "nc2_orth", "nc2_equinorm", "cdnv", "rank", "ncc_accuracy", "nc4")
WEIGHT_KEYS = ("nc3_span", "nc3_duality", "nc3_duality_uncentred", "nc3_zhu")
EPS = {np.dtype(np.float64): float(np.finfo(np.float64).eps), np.dtype(np.float32): float(np.finfo(np.float32).eps)}


def np_ncc(h: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Nearest class centre of every row of h (Euclidean), straight from the definition."""
    h = h.reshape(len(h), -1).astype(np.float64)
    return ((h[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)


def np_metrics(
    h: np.ndarray,
    y: np.ndarray,
    k: int,
    weight: np.ndarray | None,
    inp: np.ndarray | None,
    *,
    pred: np.ndarray | None = None,
    bias: bool = True,
) -> dict:
    """The metrics the probe reports, from the shared numpy reference on all features at once: those of ``h``
    (NC4 against the model's predictions ``pred``), and NC3 of ``weight`` with the class means of its input
    ``inp`` (self-duality centred with a ``bias``, uncentred without)."""
    ref = np_conventions(h, y, eps_in=EPS[h.dtype], factor=RTOL_FACTOR, pred=pred)
    out = {key: ref[key] for key in METRIC_KEYS if key in ref}
    out["dim"] = float(h.reshape(len(h), -1).shape[1])
    if weight is not None and inp is not None:
        wref = np_conventions(inp, y, eps_in=EPS[inp.dtype], factor=RTOL_FACTOR, weight=weight.astype(np.float64))
        drop = "nc3_duality_uncentred" if bias else "nc3_duality"
        out |= {key: wref[key] for key in WEIGHT_KEYS if key in wref and key != drop}
    return out


def reference(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Metrics of every module of a Sequential from its full-data intermediate outputs."""
    out: dict[str, dict] = {}
    h = x
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
        for i, module in enumerate(model):
            inp, h = h, module(h)
            w = module.weight.numpy() if isinstance(module, nn.Linear) else None
            out[str(i)] = np_metrics(h.numpy(), y.numpy(), K, w, inp.numpy(), pred=pred)
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
    assert "nc3_span" in res["0"] and "nc3_duality" in res["4"] and "nc3_span" not in res["1"]
    assert_matches(res, reference(model, x, y))
    assert no_hooks(model)


@pytest.mark.parametrize("size", [29, 400])
def test_cnn_matches_numpy(digits, size: int) -> None:
    x, y = digits
    model = cnn()
    probe = DNCProbe(model, layers=[nn.Conv2d, "relu", "3", "linear"], num_classes=K, cov="light")
    res = probe.measure(loader(x, y, size))
    assert list(res) == ["1", "2", "3", "5", "6", "7"]
    assert res["1"]["dim"] == 4 * 6 * 6 and "nc3_span" not in res["1"]  # conv weights: no NC3
    assert_matches(res, reference(model, x, y))
    assert probe.stats["1"].sigma_w is None


def test_one_pass_matches_two_passes_without_nc4(digits) -> None:
    x, y = digits
    model = mlp()
    two = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 64))
    one = DNCProbe(model, layers="relu", num_classes=K, passes=1).measure(iter(loader(x, y, 64)))
    assert list(two) == ["1", "3", "4"] and sorted(two["4"]) == [
        "nc3_duality",
        "nc3_span",
        "nc3_zhu",
    ]  # "4": the classifier, not probed
    for name in ("1", "3"):
        assert "nc4" not in one[name] and "ncc_accuracy" not in one[name]  # no means before the only pass
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
    assert res["0"]["nc1"] < 1e-10 and res["0"]["nc2_etf"] < 1e-6 and res["0"]["ncc_accuracy"] == 1.0


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
    with pytest.warns(UserWarning, match=r"class\(es\) \[7\] have no samples; measuring the 9 classes") as caught:
        probe.measure(loader(x, few, 100))
    assert len(caught) == 1 and probe.stats["4"].class_ids == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    with pytest.raises(
        DeepCollapseError,
        match=r"must yield \(inputs, labels\) pairs, dicts with a label key, or use batch_fn; got Tensor",
    ):
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


def test_module_called_a_varying_number_of_times_or_never() -> None:
    class Loops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(1 + int(x.shape[0] > 4)):  # once for small batches, twice for big ones
                x = self.lin(x)
            return x

    data = [(torch.randn(4, 3), torch.arange(4) % 2), (torch.randn(6, 3), torch.arange(6) % 2)]
    with pytest.raises(DeepCollapseError, match="layer 'lin' ran 2 times in the forward pass of batch 1 but 1 times"):
        DNCProbe(Loops(), layers="lin", num_classes=2).measure(data)
    with pytest.raises(DeepCollapseError, match="layer 'lin' ran 1 times in the forward pass of batch 1 but 2 times"):
        DNCProbe(Loops(), layers="lin", num_classes=2).measure(data[::-1])
    data = [(torch.randn(6, 3), torch.arange(6) % 2)]

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
        for key in ("nc1", "nc2_etf", "nc3_span", "cdnv"):
            if key in cpu[name]:
                assert gpu[name][key] == pytest.approx(cpu[name][key], rel=1e-7), (name, key)


# ------------------------------------------------------------------ real models: reused modules, state


class Block(nn.Module):
    """A torchvision-style basic block: one ReLU module used twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResNetish(nn.Module):
    def __init__(self, *, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.layer1 = Block(4)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, K, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.layer1(torch.relu(self.stem(x))))))


def trained_resnetish(x: torch.Tensor, y: torch.Tensor, *, bias: bool = True) -> ResNetish:
    torch.manual_seed(3)
    model = ResNetish(bias=bias).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(5):  # a few steps: non-trivial BatchNorm running statistics, num_batches_tracked = 5
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i * 80 : (i + 1) * 80]), y[i * 80 : (i + 1) * 80]).backward()
        opt.step()
    return model


def resnetish_reference(model: ResNetish, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """The block's intermediate features computed by hand in eval mode, then the numpy reference."""
    b, yn = model.layer1, y.numpy()
    with torch.no_grad():
        x0 = torch.relu(model.stem.eval()(x))
        a = torch.relu(b.bn1.eval()(b.conv1(x0)))
        c = torch.relu(b.bn2.eval()(b.conv2(a)) + x0)
        feat = model.pool(c)
        logits = model.fc(feat)
    pred = logits.argmax(1).numpy()
    w = model.fc.weight.detach().numpy()
    out = {
        "layer1.relu#1": np_metrics(a.numpy(), yn, K, None, None, pred=pred),
        "layer1.relu#2": np_metrics(c.numpy(), yn, K, None, None, pred=pred),
        "pool.1": np_metrics(feat.numpy(), yn, K, None, None, pred=pred),
        "fc": np_metrics(logits.numpy(), yn, K, w, feat.numpy(), pred=pred, bias=model.fc.bias is not None),
    }
    return out


def state_of(model: nn.Module) -> tuple[dict, list[bool]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_same_state(model: nn.Module, before: tuple[dict, list[bool]]) -> None:
    after = state_of(model)
    assert after[1] == before[1]
    assert after[0].keys() == before[0].keys()
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value), key


@pytest.mark.parametrize("bias", [True, False])
def test_residual_block_reusing_its_relu(digits, bias: bool) -> None:
    x, y = digits
    model = trained_resnetish(x, y, bias=bias)
    model.train()
    model.stem.eval()  # a mixed state, restored module by module
    before = state_of(model)
    assert int(before[0]["layer1.bn1.num_batches_tracked"]) == 5
    probe = DNCProbe(model, layers=[model.layer1.relu, "pool.1", model.fc], num_classes=K)
    res = probe.measure(loader(x, y, 57))
    assert list(res) == ["layer1.relu#1", "layer1.relu#2", "pool.1", "fc"]
    assert_same_state(model, before)
    assert no_hooks(model)
    assert_matches(res, resnetish_reference(model, x, y), rel=1e-7)


def test_train_mode_only_when_asked_and_state_restored(digits) -> None:
    x, y = digits
    model = trained_resnetish(x, y)
    model.eval()
    before = state_of(model)
    with pytest.warns(UserWarning, match="mode='train'"):
        res = DNCProbe(model, layers="pool.1", num_classes=K, mode="train").measure(loader(x, y, 100))
    assert_same_state(model, before)  # running statistics and num_batches_tracked restored
    evaluated = DNCProbe(model, layers="pool.1", num_classes=K).measure(loader(x, y, 100))
    assert res["pool.1"]["nc1"] != pytest.approx(evaluated["pool.1"]["nc1"], rel=1e-3)  # train mode did run
    assert_same_state(model, before)
    with pytest.raises(DeepCollapseError, match="mode must be 'eval' or 'train'"):
        DNCProbe(model, layers="fc", num_classes=K, mode="test")  # type: ignore[arg-type]


def test_module_objects_in_layers() -> None:
    model = cnn()
    names = [n for n, _ in resolve_layers(model, [model[7], nn.Conv2d, model[2]])]
    assert names == ["1", "2", "7"]
    with pytest.raises(DeepCollapseError, match="the Linear module given is not a submodule"):
        resolve_layers(model, nn.Linear(2, 2))


# ------------------------------------------------------------------------------- batches and labels


@pytest.mark.parametrize("form", ["column", "one_hot", "dict", "batch_fn", "extra"])
def test_batch_and_label_forms_give_the_same_result(digits, form: str) -> None:
    x, y = digits
    model = mlp()
    plain = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 64))
    data: list = loader(x, y, 64)
    kwargs: dict = {}
    if form == "column":
        data = [(a, b[:, None]) for a, b in data]
    elif form == "one_hot":
        data = [(a, nn.functional.one_hot(b, K).float()) for a, b in data]
    elif form == "dict":
        data = [{"input": a, "labels": b} for a, b in data]  # the rest are keyword arguments: Sequential(input=)
    elif form == "batch_fn":
        data = [{"image": a, "meta": {"target": b}} for a, b in data]
        kwargs["batch_fn"] = lambda batch: (batch["image"], batch["meta"]["target"])
    else:
        data = [(a, b, torch.zeros(len(b))) for a, b in data]  # (inputs, labels, extra)
    res = DNCProbe(model, layers="relu", num_classes=K, **kwargs).measure(data)
    assert res == plain


def test_bad_labels_and_batches(digits) -> None:
    x, y = digits
    probe = DNCProbe(mlp(), layers="relu", num_classes=K)
    soft = torch.full((10, K), 0.1)
    with pytest.raises(DeepCollapseError, match=r"batch 0: labels: \(batch, 10\) labels must be one-hot rows"):
        probe.measure([(x[:10], soft)])
    with pytest.raises(DeepCollapseError, match=r"labels must be \(batch,\) integers, \(batch, 1\) or"):
        probe.measure([(x[:10], y[:10].reshape(2, 5, 1))])
    with pytest.raises(DeepCollapseError, match=r"a dict batch needs its labels under one of \['labels'"):
        probe.measure([{"x": x[:10], "cls": y[:10]}])
    with pytest.raises(DeepCollapseError, match="batch_fn must return \\(inputs, labels\\)"):
        DNCProbe(mlp(), layers="relu", num_classes=K, batch_fn=lambda b: b[0]).measure(loader(x, y, 100))
    assert no_hooks(probe.model)


# ------------------------------------------------------------------------------ passes that differ


def test_shuffle_with_drop_last_refused_before_measuring(digits) -> None:
    x, y = digits
    model = mlp()
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    data = torch.utils.data.TensorDataset(x, y)
    bad = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
    with pytest.raises(DeepCollapseError, match="shuffle=True and drop_last=True drops a different 16 of its 400"):
        DNCProbe(model, layers="relu", num_classes=K).measure(bad)
    assert calls == []
    fine = torch.utils.data.DataLoader(data, batch_size=50, shuffle=True, drop_last=True)  # 400 = 8 x 50
    res = DNCProbe(model, layers="relu", num_classes=K).measure(fine)
    ordered = DNCProbe(model, layers="relu", num_classes=K).measure(loader(x, y, 50))
    assert res["3"]["nc1"] == pytest.approx(ordered["3"]["nc1"], rel=1e-10)


class Drifting:
    """A re-iterable loader whose second pass draws other samples (e.g. sampling with replacement)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.epoch, self.batches = x, y, 0, 0

    def __iter__(self):
        self.epoch += 1
        idx = torch.arange(len(self.y)) if self.epoch == 1 else torch.sort(self.y, stable=True).indices
        for i in range(0, len(idx), 40):
            self.batches += 1
            j = idx[i : i + 40] if self.epoch == 1 else idx[:40]  # pass 2: class 0 over and over
            yield self.x[j], self.y[j]


def test_passes_that_see_different_samples_stop_at_the_batch(digits) -> None:
    x, y = digits
    data = Drifting(x, y)
    with pytest.raises(DeepCollapseError, match=r"pass 2 yielded 80 samples of class 0 so far, pass 1 41"):
        DNCProbe(mlp(), layers="relu", num_classes=K).measure(data)
    assert data.batches == 10 + 2  # stopped at the second batch of pass 2


# ------------------------------------------------------------------- classifier and the test protocol


def test_classifier_choice(digits) -> None:
    x, y = digits
    model = mlp()
    assert DNCProbe(model, layers="relu", num_classes=K).classifier == ("4", model[4])
    none = DNCProbe(model, layers="relu", num_classes=K, classifier=None).measure(loader(x, y, 100))
    assert list(none) == ["1", "3"] and "nc4" not in none["1"] and "ncc_accuracy" in none["1"]
    with pytest.raises(DeepCollapseError, match=r"classifier: '2' must have a 2-D weight with num_classes=10 rows"):
        DNCProbe(model, layers="relu", num_classes=K, classifier="2")
    assert DNCProbe(nn.Sequential(nn.Linear(3, 4)), layers="0", num_classes=2).classifier is None


def test_test_set_measured_against_train_means(digits) -> None:
    x, y = digits
    model = trained_resnetish(x, y)
    train, test = (x[:300], y[:300]), (x[300:], y[300:])
    probe = DNCProbe(model, layers=["pool.1", "fc"], num_classes=K)
    probe.measure(loader(*train, 64))
    train_stats = dict(probe.stats)
    ref = resnetish_reference(model, *train)
    assert probe.stats["pool.1"].ncc_correct.sum() == round(ref["pool.1"]["ncc_accuracy"] * 300)
    for passes in (2, 1):
        p = DNCProbe(model, layers=["pool.1", "fc"], num_classes=K, passes=passes)
        res = p.measure(loader(*test, 64), reference=train_stats)
        own = resnetish_reference(model, *test)  # the test set's own statistics ...
        with torch.no_grad():
            model.eval()
            feat = model.pool(model.layer1(torch.relu(model.stem(test[0])))).numpy()
            pred = model.fc(torch.tensor(feat)).argmax(1).numpy()
        ncc = np_ncc(feat, train_stats["pool.1"].means.numpy())  # ... but NCC rules from the train means
        assert res["pool.1"]["ncc_accuracy"] == pytest.approx(float((ncc == test[1].numpy()).mean()), abs=1e-12)
        assert res["pool.1"]["nc4"] == pytest.approx(float((ncc != pred).mean()), abs=1e-12)
        assert res["pool.1"]["nc1"] == pytest.approx(own["pool.1"]["nc1"], rel=1e-8)
        assert res["pool.1"]["ncc_accuracy"] != pytest.approx(own["pool.1"]["ncc_accuracy"], abs=1e-3)
    few = train[1] != 7  # a train set without class 7: its reference means cover 9 classes
    probe.measure(loader(train[0][few], train[1][few], 64))
    part = dict(probe.stats)
    assert part["pool.1"].class_ids == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    res = DNCProbe(model, layers="pool.1", num_classes=K).measure(loader(*test, 64), reference=part)
    keep = test[1] != 7
    ncc = np.array(part["pool.1"].class_ids)[np_ncc(feat[keep.numpy()], part["pool.1"].means.numpy())]
    assert res["pool.1"]["ncc_accuracy"] == pytest.approx(float((ncc == test[1][keep].numpy()).mean()), abs=1e-12)
    with pytest.raises(DeepCollapseError, match="reference has no statistics for layer fc"):
        probe.measure(loader(*test, 64), reference={"pool.1": train_stats["pool.1"]})
    with pytest.raises(DeepCollapseError, match="reference must map row names to ClassStats"):
        probe.measure(loader(*test, 64), reference={"pool.1": 3})  # type: ignore[dict-item]


# ------------------------------------------------------------------------- update / compute / reset


def test_streaming_api_equals_measure(digits) -> None:
    x, y = digits
    model = trained_resnetish(x, y)
    before = state_of(model)
    probe = DNCProbe(model, layers=[model.layer1.relu, "fc"], num_classes=K)
    whole = probe.measure(loader(x, y, 64))
    probe.reset()
    for _ in range(probe.passes):
        for xb, yb in loader(x, y, 64):
            probe.update(xb, yb)
        probe.end_pass()
    assert probe.compute() == whole
    with pytest.raises(DeepCollapseError, match="all 2 pass"):
        probe.update(x[:5], y[:5])
    probe.reset()
    probe.update((x[:50], y[:50]))  # a loader batch
    with pytest.raises(DeepCollapseError, match=r"compute\(\) before the end of pass 1 of 2"):
        probe.compute()
    assert_same_state(model, before)
