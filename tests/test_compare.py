"""The comparison demo: data, label noise, devices, CIFAR-10 folders and a tiny end-to-end run."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

np = pytest.importorskip("numpy")

from zsharp_algos._optional import require
from zsharp_algos.demo.data import CIFAR10_FILES, CIFAR10_FOLDER, corrupt_labels, load_cifar10, load_data
from zsharp_algos.demo.devices import autocast_dtype, resolve_device

DIGITS = 1797


# --------------------------------------------------------------------------- digits + label noise
@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_data("digits", seed=0, label_noise=0.4), load_data("digits", seed=0, label_noise=0.0)


def test_digits_shapes_and_normalisation(digits):
    noisy, _ = digits
    assert noisy.train_x.shape[1:] == noisy.test_x.shape[1:] == (3, 32, 32)
    assert len(noisy.train_y) + len(noisy.test_y) == DIGITS
    assert len(noisy.test_y) == 360  # stratified 20% split
    assert noisy.train_x.dtype == torch.float32 and noisy.train_y.dtype == torch.int64
    assert noisy.train_x.mean().abs() < 1e-4 and (noisy.train_x.std() - 1).abs() < 1e-2
    assert torch.bincount(noisy.test_y, minlength=10).min() >= 35  # every class in the test split


def test_digits_deterministic_by_seed(digits):
    noisy, _ = digits
    again = load_data("digits", seed=0, label_noise=0.4)
    for field in ("train_x", "train_y", "test_x", "test_y", "noisy"):
        assert torch.equal(getattr(noisy, field), getattr(again, field))
    other = load_data("digits", seed=1, label_noise=0.4)
    assert not torch.equal(noisy.test_y, other.test_y)


def test_label_noise_rate_exact_and_test_labels_clean(digits):
    noisy, clean = digits
    n = len(noisy.train_y)
    changed = noisy.train_y != clean.train_y
    assert int(changed.sum()) == round(0.4 * n)
    assert torch.equal(changed, noisy.noisy)  # every replaced label is a different class
    assert torch.equal(noisy.test_y, clean.test_y) and torch.equal(noisy.test_x, clean.test_x)
    assert not clean.noisy.any()


def test_corrupt_labels():
    labels = torch.arange(1000) % 10
    new, mask = corrupt_labels(labels, 0.25, 10, seed=3)
    assert int(mask.sum()) == 250 and torch.equal(new != labels, mask)
    counts = torch.bincount(new[mask], minlength=10)
    assert counts.min() > 0  # the wrong classes are spread over all classes
    assert torch.equal(corrupt_labels(labels, 0.25, 10, seed=3)[0], new)
    assert torch.equal(corrupt_labels(labels, 0.0, 10)[0], labels)
    with pytest.raises(ValueError, match="label noise"):
        corrupt_labels(labels, 1.5, 10)


def test_subsets(digits):
    small = load_data("digits", seed=0, label_noise=0.5, train_subset=100, test_subset=50)
    assert len(small.train_y) == 100 and len(small.test_y) == 50 and int(small.noisy.sum()) == 50


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        load_data("imagenet")


# --------------------------------------------------------------------------- CIFAR-10 folders
def _write_fake_cifar(folder, per_batch=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CIFAR10_FILES):
        data = np.zeros((per_batch, 3 * 32 * 32), dtype=np.uint8)
        data[:, 1024:2048] = 100 + i  # channel 1 (green) of every image
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": [(i + k) % 10 for k in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_missing_folder_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar10(tmp_path / "nowhere")
    _write_fake_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing: test_batch"):
        load_cifar10(tmp_path / "partial")
    with pytest.raises(ValueError, match="--data-dir"):
        load_data("cifar10")


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_reads_python_batches(tmp_path, nested):
    _write_fake_cifar(tmp_path / CIFAR10_FOLDER if nested else tmp_path)
    train_x, train_y, test_x, test_y = load_cifar10(tmp_path)
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8 and test_x.shape == (4, 3, 32, 32)
    assert train_x[:4, 1].eq(100).all() and train_x[:, 0::2].eq(0).all()  # channel-first layout
    assert test_x[:, 1].eq(105).all() and test_y.tolist() == [5, 6, 7, 8]
    data = load_data("cifar10", data_dir=tmp_path, label_noise=0.5)
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.float32
    assert int(data.noisy.sum()) == 10 and torch.equal(data.test_y, test_y)


# --------------------------------------------------------------------------- devices and precision
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS"):
            resolve_device("mps")


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype("fp8", cpu)


def test_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"zsharp-algos\[demo\]"):
        require("surely_not_installed_zsharp_module", "demo", "this test")


# --------------------------------------------------------------------------- the command line
def test_parse_args():
    from zsharp_algos.demo.compare import parse_args

    args = parse_args([])
    assert args.seeds == [0] and args.optimizers == ["sgd", "sam", "zsharp"] and args.label_noise == 0.4
    assert parse_args(["--seeds", "3"]).seeds == [0, 1, 2]
    assert parse_args(["--seeds", "4,9"]).seeds == [4, 9]
    assert parse_args(["--seeds", "7,"]).seeds == [7]
    assert parse_args(["--model-kwarg", "patch_size=4", "--model-kwarg", "global_pool=avg"]).model_kwarg == [
        ("patch_size", 4), ("global_pool", "avg")
    ]
    for bad in (["--seeds", "0"], ["--optimizers", "sgd,lion"], ["--epochs", "0"], ["--scope", "layer"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_build_model_vit_small_images():
    pytest.importorskip("timm")
    from zsharp_algos.demo.compare import build_model

    vit = build_model("vit_tiny_patch16_224", 10, patch_size=4, depth=1)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("no_such_model", 10)


@pytest.fixture
def demo_deps():
    for module in ("timm", "sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module)


# timm's own 370k-parameter test ResNet (BatchNorm included) keeps these runs to seconds.
TINY = ["--model", "test_resnet", "--epochs", "1", "--train-subset", "32", "--test-subset", "32",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip


def test_main_end_to_end(tmp_path, capsys, demo_deps):
    from zsharp_algos.demo.compare import main

    assert main([*TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "optimizer" in printed and "time/step vs sgd" in printed
    for name in ("sgd", "sam", "zsharp"):
        assert any(line.startswith(name + " ") for line in printed.splitlines())
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"settings", "versions", "machine", "runs", "summary"}
    assert results["settings"]["label_noise"] == 0.4 and results["versions"]["torch"] == torch.__version__
    assert [r["optimizer"] for r in results["runs"]] == ["sgd", "sam", "zsharp"]
    run = results["runs"][0]
    assert run["steps"] == 2 and len(run["epochs"]) == 1
    assert set(run["epochs"][0]) >= {"train_loss", "test_loss", "test_acc"}
    summary = results["summary"]
    assert summary["sgd"]["step_time_ratio"] == pytest.approx(1.0)
    assert summary["sgd"]["step_cpu_time_ratio"] == pytest.approx(1.0)
    assert 0.0 <= summary["zsharp"]["test_acc_mean"] <= 1.0
    # on the CPU the table has the CPU-time column, the title says "1 seed", a line says the load
    assert "CPU time/step vs sgd" in printed and "40% label noise, 1 seed: final epoch\n" in printed
    assert "machine load:" in printed
    assert run["step_cpu_time_s"] > 0 and len(run["load_average"]) == 2


def test_report_title_caption_and_load_note():
    from zsharp_algos.demo import report

    assert report.title("resnet18", "digits", 0.4, 1) == "resnet18 on digits, 40% label noise, 1 seed"
    assert report.title("resnet18", "digits", 0.4, 3).endswith("3 seeds")
    assert "memorised" in report.caption(0.4, ["sgd", "zsharp"]) and "SGD's" in report.caption(0.4, ["sgd"])
    assert report.caption(0.0, ["sgd"]) == ""
    runs = [{"load_average": [0.1, 0.4]}]
    assert "idle enough" in report.load_note(runs, 2)
    assert "was loaded" in report.load_note([{"load_average": [3.5, 4.0]}], 2)
    assert "not reported" in report.load_note([{"load_average": [None, None]}], 2)


def test_main_is_reproducible(tmp_path, demo_deps):
    from zsharp_algos.demo.compare import main

    args = [*TINY, "--optimizers", "zsharp"]
    curves = []
    for out in ("a", "b"):
        main([*args, "--out", str(tmp_path / out)])
        runs = json.loads((tmp_path / out / "results.json").read_text())["runs"]
        curves.append([{k: v for k, v in e.items() if k != "train_time_s"} for r in runs for e in r["epochs"]])
    assert curves[0] == curves[1]


def test_main_bad_options_exit_with_a_message(tmp_path, demo_deps):
    from zsharp_algos.demo.compare import main

    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit, match="never downloads"):
        main(["--data", "cifar10", "--data-dir", str(tmp_path / "missing"), *out])
    with pytest.raises(SystemExit, match="unknown device"):
        main(["--device", "tpu", *out])
    with pytest.raises(SystemExit, match="unknown timm model"):
        main(["--model", "no_such_model", *out])
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
