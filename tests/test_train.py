"""Training loop: loss units vs the DUFM objective, collapse in the head, exact resume, theory, errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcollapse import theory
from deepcollapse._validate import DeepCollapseError, DivergenceError
from deepcollapse.dufm.model import DUFMConfig, labels_from_counts
from deepcollapse.files import read_csv
from deepcollapse.nets.data import DataConfig, Dataset, load_dataset
from deepcollapse.nets.models import DUFMHead, NetConfig
from deepcollapse.nets.train import (
    BACKBONE_DEFAULTS,
    PRESETS,
    TrainConfig,
    compare_with_theory,
    epoch_metrics,
    fit_to_optimal,
    loss_terms,
    lr_at,
    make_config,
    train,
)

NET = NetConfig(backbone="mlp", mlp_width=32, mlp_depth=1, feature_dim=8, head_layers=3, head_width=8)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits", classes=[0, 1], per_class=60))


def small(**kw) -> TrainConfig:
    base = {"data": DataConfig(name="digits", classes=[0, 1], per_class=60), "net": NET, "epochs": 4,
            "batch_size": 16, "fit_optimal_epochs": 0}  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _dufm_loss_np(h1: np.ndarray, ws: list[np.ndarray], labels: np.ndarray, k: int, lam_h: float, lam_w: float):
    """The DUFM objective written out in numpy (rows are samples): 1/(2N)||W_L H_L - Y||² + λ_W/2 Σ||W_l||²
    + λ_H1/2 ||H1||², H_{l+1} = relu(W_l H_l)."""
    h = h1.T
    for w in ws[:-1]:
        h = np.maximum(w @ h, 0.0)
    y = np.eye(k)[:, labels]
    fit = ((ws[-1] @ h - y) ** 2).sum() / (2 * len(labels))
    return fit + lam_w / 2 * sum((w**2).sum() for w in ws) + lam_h / 2 * (h1**2).sum(), fit


def test_full_batch_loss_is_the_dufm_objective() -> None:
    torch.manual_seed(0)
    k, n, d = 3, 4, 5
    labels = labels_from_counts([n] * k)
    head = DUFMHead(d, width=6, num_layers=3, num_classes=k).double()
    h1 = (torch.randn(k * n, d, dtype=torch.float64) + 3.0) * 0.7  # features off the origin
    with torch.no_grad():
        _, out = head(h1)
    ws = [w.detach() for w in head.weights()]
    terms = loss_terms(h1, out, labels, ws, [], num_samples=k * n, lambda_w=0.01, lambda_h=0.003)
    total, fit = _dufm_loss_np(h1.numpy(), [w.detach().numpy() for w in ws], labels.numpy(), k, 0.003, 0.01)
    assert float(terms["total"]) == pytest.approx(total, rel=1e-12)
    assert float(terms["fit"]) == pytest.approx(fit, rel=1e-12)
    # equal mini-batches of a partition average to the full-batch loss (an unbiased estimate)
    parts = [loss_terms(h1[i : i + 4], out[i : i + 4], labels[i : i + 4], ws, [], num_samples=k * n,
                        lambda_w=0.01, lambda_h=0.003)["total"] for i in range(0, k * n, 4)]  # fmt: skip
    assert float(torch.stack(parts).mean()) == pytest.approx(total, rel=1e-12)
    # the backbone's decay: λ_B/2 Σ ||θ||² over tensors of any shape
    theta = [torch.ones(2, 3, 3, 3, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)]
    with_b = loss_terms(h1, out, labels, ws, theta, num_samples=k * n, lambda_w=0.01, lambda_h=0.003, backbone_wd=0.1)
    assert float(with_b["reg_backbone"]) == pytest.approx(0.05 * (54 + 16), rel=1e-12)


def test_lr_schedules() -> None:
    cfg = small(epochs=8, lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(4, cfg) == pytest.approx(0.05)
    step = replace(cfg, schedule="step")
    assert [lr_at(e, step) for e in (3, 4, 6)] == pytest.approx([0.1, 0.01, 0.001])
    assert lr_at(7, replace(cfg, schedule="constant")) == 0.1
    warm = replace(cfg, schedule="constant", warmup_epochs=2)
    assert [lr_at(e, warm, step=b, steps=4) for e, b in ((0, 0), (0, 3), (1, 3), (2, 0))] == pytest.approx(
        [0.0125, 0.05, 0.1, 0.1]
    )
    assert lr_at(2, cfg, step=2, steps=4) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2.5 / 8)))


def test_nc1_falls_in_the_head(tmp_path: Path, digits: Dataset) -> None:
    res = train(small(epochs=20, lambda_w=0.02, lambda_h=1e-3), tmp_path / "run", data=digits, num_threads=1)
    h = res.history
    assert h[-1]["nc1_l3"] < h[0]["nc1_l3"] / 10
    assert h[-1]["nc1_out"] < h[0]["nc1_out"] / 10
    assert res.summary["train_accuracy"] == 1.0
    rows = read_csv(tmp_path / "run" / "history.csv")
    assert len(rows) == 20 and {"nc1_h1", "nc2_orth_l2", "nc3_span_l3", "test_acc", "dufm_loss"} <= set(rows[0])
    th = res.summary["theory"]
    assert th["loss"] > th["dnc_loss"] > 0  # K = 2: L_DNC is the global optimum
    assert [e["layer"] for e in res.summary["layers"]] == ["h1", "l2", "l3", "out"]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0 and (tmp_path / "run" / "loss.png").exists()


def test_resume_after_a_kill_repeats_the_run(tmp_path: Path, digits: Dataset) -> None:
    cfg = small(epochs=4)
    full = train(cfg, tmp_path / "full", data=digits, num_threads=1)
    part = train(cfg, tmp_path / "cut", data=digits, stop_after=2, num_threads=1)
    assert part.stopped_early and len(part.history) == 2
    resumed = train(cfg, tmp_path / "cut", data=digits, resume=True, num_threads=1)
    assert strip_time(resumed.history) == strip_time(full.history)
    on_disk = [strip_time(read_csv(tmp_path / d / "history.csv")) for d in ("cut", "full")]
    assert on_disk[0] == on_disk[1]
    assert resumed.summary["layers"] == full.summary["layers"]


def test_extend_epochs_under_a_constant_schedule(tmp_path: Path, digits: Dataset) -> None:
    full = train(small(epochs=3, schedule="constant"), tmp_path / "a", data=digits, num_threads=1)
    train(small(epochs=2, schedule="constant"), tmp_path / "b", data=digits, num_threads=1)
    more = train(small(epochs=3, schedule="constant"), tmp_path / "b", data=digits, resume=True, num_threads=1)
    assert strip_time(more.history) == strip_time(full.history)
    train(small(epochs=4), tmp_path / "c", data=digits, stop_after=1, num_threads=1)
    with pytest.raises(DeepCollapseError, match="resume with --epochs 4"):  # cosine depends on --epochs
        train(small(epochs=5), tmp_path / "c", data=digits, resume=True)


def test_resume_refuses_another_config_and_corrupt_checkpoints(tmp_path: Path, digits: Dataset) -> None:
    train(small(epochs=1), tmp_path / "r", data=digits, num_threads=1)
    with pytest.raises(DeepCollapseError, match=r"different configuration.*lr"):
        train(small(epochs=1, lr=0.5), tmp_path / "r", data=digits, resume=True)
    with pytest.raises(DeepCollapseError, match="already holds a run"):
        train(small(epochs=1), tmp_path / "r", data=digits)
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(DeepCollapseError, match="cannot read checkpoint"):
        train(small(epochs=1), tmp_path / "r", data=digits, resume=True)


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path: Path, digits: Dataset) -> None:
    cfg = small(epochs=3)
    train(cfg, tmp_path / "n", data=digits, stop_after=1, num_threads=1)
    before = (tmp_path / "n" / "checkpoint.pt").read_bytes()
    bad = replace(digits, x_train=digits.x_train.clone())
    bad.x_train[:] = float("nan")
    with pytest.raises(DivergenceError, match=r"epoch 2, batch 1; the last good checkpoint \(epoch 1\) is kept"):
        train(cfg, tmp_path / "n", data=bad, resume=True, num_threads=1)
    assert (tmp_path / "n" / "checkpoint.pt").read_bytes() == before
    assert len(read_csv(tmp_path / "n" / "history.csv")) == 1


def test_theory_comparison_at_the_dufm_optimum() -> None:
    cfg = small(lambda_w=5e-3, lambda_h=5e-3, net=replace(NET, feature_dim=6, head_width=6))
    dcfg = DUFMConfig(num_classes=2, n_per_class=5, num_layers=3, width=6, lambda_h=5e-3, lambda_w=5e-3)
    h1, ws = theory.optimal_parameters(dcfg)
    res = compare_with_theory(h1.T, ws, labels_from_counts([5, 5]), cfg, num_classes=2)
    assert res["dnc_loss"] == pytest.approx(0.029794, abs=1e-6)  # docs/theory.md
    assert abs(res["gap"]) < 1e-10 and res["n"] == 5 and res["verdict"] == "dnc"
    assert all(e["nc3_span"] < 1e-10 for e in res["layers"])
    assert all(e["nc2_orth"] < 1e-10 for e in res["layers"][1:])


def test_fit_to_optimal(digits: Dataset) -> None:
    cfg = small(lambda_h=1e-3)
    torch.set_num_threads(1)
    res = fit_to_optimal(digits, cfg, device=torch.device("cpu"), epochs=3)
    assert 0 <= res["rel_error_train"] < 1 and math.isfinite(res["rel_error_test"])
    assert res["loss"] >= res["dnc_loss"] > 0


def test_make_config_precedence() -> None:
    cfg = make_config({"epochs": 7, "dataset": "digits", "classes": [0, 1], "seed": 3}, preset="cpu-quick")
    assert cfg.epochs == 7 and cfg.data.per_class == PRESETS["cpu-quick"]["per_class"]
    assert cfg.data.seed == 3 and cfg.data.classes == [0, 1]
    with pytest.raises(DeepCollapseError, match="unknown preset"):
        make_config({}, preset="huge")
    with pytest.raises(DeepCollapseError, match="optimizer must be one of"):
        make_config({"optimizer": "lbfgs"})


def test_cross_entropy_and_measured_subset(tmp_path: Path, digits: Dataset) -> None:
    res = train(small(epochs=2, loss="ce", measure_per_class=10), tmp_path / "ce", data=digits, num_threads=1)
    assert len(res.history) == 2 and res.history[-1]["ncc_accuracy_l3"] >= 0.5
    assert res.summary["theory"]["loss"] > 0  # the head is still compared in DUFM (MSE) units


@pytest.mark.parametrize("backbone", sorted(BACKBONE_DEFAULTS))
def test_every_backbone_trains_with_its_defaults(tmp_path: Path, backbone: str) -> None:
    # issue 12: lr 0.05 without warm-up made the batch-normalized backbones diverge within five batches
    cfg = make_config({"dataset": "digits", "backbone": backbone, "head_layers": 4, "per_class": 30,
                       "test_per_class": 5, "epochs": 6, "fit_optimal_epochs": 0})  # fmt: skip
    assert (cfg.lr, cfg.warmup_epochs) == tuple(BACKBONE_DEFAULTS[backbone].values())
    res = train(cfg, tmp_path / backbone, num_threads=1)
    losses = [r["loss"] for r in res.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]
    assert res.history[-1]["train_acc"] > 0.4  # 10 classes: chance is 0.1


def test_explicit_learning_rate_wins_over_the_backbone_default() -> None:
    cfg = make_config({"backbone": "resnet20", "lr": 0.2, "warmup_epochs": 0})
    assert (cfg.lr, cfg.warmup_epochs) == (0.2, 0.0)
    assert make_config({"backbone": "cnn"}, preset="cpu-quick").lr == PRESETS["cpu-quick"]["lr"]


def test_epoch_metrics_nc4_is_papyans_disagreement_with_the_network() -> None:
    """NC4 of every layer: the fraction of samples whose nearest class mean at that layer (numpy, float64, from the
    definition) differs from the network's prediction (argmax of the output layer); ncc_accuracy against labels."""
    g = torch.Generator().manual_seed(3)
    k, n = 4, 30
    y = torch.arange(k).repeat_interleave(n)
    h1 = torch.randn(k, 6, generator=g)[y] * 0.6 + torch.randn(k * n, 6, generator=g)
    w1, w2 = torch.randn(5, 6, generator=g), torch.randn(k, 5, generator=g)
    h2 = torch.relu(h1 @ w1.T)
    out = h2 @ w2.T + 0.8 * torch.randn(k * n, k, generator=g)  # a noisy classifier: disagrees on some samples
    flat, rows = epoch_metrics([h1, h2, out], y, k, [w1, w2])
    pred = out.argmax(1).numpy()
    seen = set()
    for row, h in zip(rows, [h1, h2, out], strict=True):
        hh = h.double().numpy()
        means = np.stack([hh[y.numpy() == c].mean(0) for c in range(k)])
        ncc = ((hh[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)  # nearest class mean, from the definition
        assert row["nc4"] == pytest.approx(float((ncc != pred).mean()), abs=1e-15)
        assert row["ncc_accuracy"] == pytest.approx(float((ncc == y.numpy()).mean()), abs=1e-15)
        seen.add(row["nc4"])
    assert len(seen) > 1 and max(seen) > 0  # the layers disagree with the classifier by different amounts
    assert flat[f"nc4_{rows[0]['layer']}"] == rows[0]["nc4"]
