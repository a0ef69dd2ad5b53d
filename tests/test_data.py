import pytest
import torch
from PIL import Image

from freezetune.config import DataConfig
from freezetune.errors import DataError
from freezetune.training import data as data_module
from freezetune.training.data import (
    EpochSampler,
    SeededSamples,
    build_data,
    make_loader,
    synthetic_dataset,
    worker_count,
)


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic_dataset(40, 32, 4, seed=3), synthetic_dataset(40, 32, 4, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert torch.bincount(a.tensors[1]).tolist() == [10, 10, 10, 10]
    assert not torch.equal(a.tensors[0], synthetic_dataset(40, 32, 4, seed=4).tensors[0])


def test_synthetic_classes_differ_visibly():
    # Class means in colour differ far more than the spread within a class: learnable structure.
    ds = synthetic_dataset(200, 32, 4, seed=0)
    x, y = ds.tensors
    colour = x.mean(dim=(2, 3))
    means = torch.stack([colour[y == k].mean(0) for k in range(4)])
    within = torch.stack([colour[y == k].std(0) for k in range(4)]).mean()
    assert torch.cdist(means, means).fill_diagonal_(float("inf")).min() > 2 * within


def test_epoch_sampler_order_depends_on_seed_and_epoch_and_resumes():
    full = list(EpochSampler(20, seed=1, epoch=2))
    assert sorted(full) == list(range(20))
    assert list(EpochSampler(20, seed=1, epoch=2, start=8)) == full[8:]
    assert full != list(EpochSampler(20, seed=1, epoch=3))
    assert len(EpochSampler(20, 1, 0, start=5)) == 15


def make_folder(root, classes=("cat", "dog"), per_class=3, size=40):
    for split in ("train", "val"):
        for i, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (size, size), (40 * i + 10 * j, 100, 200)).save(d / f"{j}.png")


def test_imagefolder_loads_train_and_val(tmp_path):
    make_folder(tmp_path)
    data = build_data(DataConfig(source="imagefolder", root=str(tmp_path), image_size=32), 2, 0)
    assert data.classes == ["cat", "dog"] and len(data.train) == 6 and len(data.val) == 6
    x, y = next(iter(make_loader(data.train, 4, 0)))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long


def test_imagefolder_problems_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        build_data(DataConfig(source="imagefolder", root=str(tmp_path / "nope")), 2, 0)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_data(DataConfig(source="imagefolder", root=str(tmp_path)), 2, 0)
    make_folder(tmp_path / "ok")
    with pytest.raises(DataError, match="has 2 classes but model.num_classes is 5"):
        build_data(DataConfig(source="imagefolder", root=str(tmp_path / "ok")), 5, 0)


def test_corrupt_image_named_or_skipped(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), image_size=32)
    data = build_data(cfg, 2, 0)
    with pytest.raises(DataError, match="broken.png"):
        list(make_loader(data.train, 8, 0))
    data = build_data(cfg.model_copy(update={"skip_bad_images": True}), 2, 0)
    batches = list(make_loader(data.train, 8, 0))
    assert sum(b[1].shape[0] for b in batches) == 6


def test_cifar10_missing_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.download: true"):
        build_data(DataConfig(source="cifar10", root=str(tmp_path)), 10, 0)


@pytest.mark.parametrize(("source", "device", "cpus", "ranks", "expected"), [
    ("synthetic", "cpu", 16, 1, 0),      # tensors in memory: a worker only adds copying
    ("synthetic", "cuda", 16, 1, 0),
    ("imagefolder", "cpu", 2, 1, 0),     # CPU training: the step's threads want every core
    ("imagefolder", "cpu", 64, 1, 0),
    ("imagefolder", "cuda", 16, 1, 8),   # beside a GPU the CPUs decode, up to 8 workers
    ("imagefolder", "cuda", 16, 4, 3),   # four ranks share the machine's 16 CPUs
    ("imagefolder", "cuda", 1, 1, 1),
    ("cifar10", "cuda", 6, 1, 5),
])
def test_auto_workers_follow_the_source_the_device_and_the_cpus(monkeypatch, source, device, cpus, ranks, expected):
    monkeypatch.setattr(data_module, "usable_cpus", lambda: cpus)
    cfg = DataConfig(source=source, root=None if source == "synthetic" else "x")
    assert cfg.num_workers == "auto"  # the default
    assert worker_count(cfg, device, ranks) == expected
    assert worker_count(cfg.model_copy(update={"num_workers": 3}), device, ranks) == 3  # a number is kept


def test_seeded_samples_draw_each_samples_transforms_from_its_own_seed():
    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    epoch0 = SeededSamples(Draw(), seed=1, epoch=0)
    # The same (seed, epoch, sample) gives the same draw in any order, from any copy (a worker's).
    forward = [epoch0[i] for i in range(4)]
    backward = [SeededSamples(Draw(), seed=1, epoch=0)[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(forward[0], SeededSamples(Draw(), seed=1, epoch=1)[0])
    assert not torch.equal(forward[0], SeededSamples(Draw(), seed=2, epoch=0)[0])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is left alone


def test_every_image_mode_loads_as_an_rgb_tensor(tmp_path):
    import numpy as np

    rgb = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    folder = tmp_path / "img" / "train" / "a"
    folder.mkdir(parents=True)
    files = {
        "rgb.jpg": rgb, "gray.jpg": rgb.convert("L"), "cmyk.jpg": rgb.convert("CMYK"),
        "rgba.png": rgb.convert("RGBA"), "la.png": rgb.convert("LA"), "palette.png": rgb.convert("P"),
        "sixteen.png": rgb.convert("I;16"), "bw.png": rgb.convert("1"), "png-named.jpg": rgb,
    }
    for name, image in files.items():
        image.save(folder / name, format="PNG" if name.endswith(".png") or name == "png-named.jpg" else "JPEG")
    data = build_data(DataConfig(source="imagefolder", root=str(tmp_path / "img"), image_size=16), 1, 0)
    images = [data.train[i][0] for i in range(len(files))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.isfinite().all() for x in images)
