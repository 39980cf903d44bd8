"""HeartTrainer's training loader (load and cut only) + the device augmentation, against nnU-Net's
own training loader and transforms: same batch layout, shapes and dtypes; the boxes the workers
cut give the augmentation of the enlarged patch nnU-Net's loader would have cut at the same place;
configurations the device augmentation does not cover keep nnU-Net's path; HeartTrainer_nnUNetDA
is nnU-Net's path.

A small preprocessed Dataset100_Heart is written with HeartPreprocessor and nnU-Net's blosc2
dataset (no image files), from the plans benchmarks/data/HeartPlans_fullsize.json with a small
patch.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("SimpleITK")  # nnUNetTrainer imports it

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # noqa: E402
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from nnunet_heart_ext.nnunet.preprocessing import HeartPreprocessor  # noqa: E402
from nnunet_heart_ext.trainers import HeartTrainer, HeartTrainer_nnUNetDA  # noqa: E402
from nnunet_heart_ext.trainers.device_augmentation import HeartDataLoader, unsupported_reason  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
PATCH = [16, 32, 32]


def small_plans():
    plans = json.loads((DATA / "HeartPlans_fullsize.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config.update(patch_size=PATCH, spacing=[1.0, 1.0, 1.0], batch_size=3)
    plans["continue_training"] = False
    return plans


def case(shape, seed):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(grid[0] ** 2 + (grid[1] - 0.2) ** 2 + grid[2] ** 2)
    image = np.where(r < 0.9, 40.0, -1000.0) + rng.normal(0, 20, shape)
    image[r < 0.5] = 300
    seg = np.zeros(shape, dtype=np.int16)
    seg[(r > 0.35) & (r < 0.5)] = 1
    seg[r <= 0.15] = 2
    seg[tuple(s // 2 + 3 for s in shape)] = 3
    return image.astype(np.float32), seg


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """nnUNet_preprocessed/Dataset100_Heart with four cases, some smaller than the enlarged patch."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    plans = small_plans()
    dataset_json = json.loads((DATA / "dataset_fullsize.json").read_text())
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset100_Heart"
    cases = folder / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    for i, shape in enumerate([(40, 60, 56), (30, 44, 48), (12, 50, 40), (24, 36, 30)]):
        image, seg = case(shape, i)
        data, seg, properties = HeartPreprocessor(verbose=False).run_case_npy(
            image[None], seg[None], {"spacing": [1.0, 1.0, 1.0]}, manager, configuration, dataset_json)
        nnUNetDatasetBlosc2.save_case(data.astype(np.float32), seg.astype(np.int16), properties,
                                      str(cases / f"patient{i + 1:04d}"))
    return plans, dataset_json, cases


def make(cls, dataset):
    plans, dataset_json, _ = dataset
    trainer = cls(json.loads(json.dumps(plans)), "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
    trainer._set_batch_size_and_oversample()
    return trainer


def test_batches_have_nnunets_layout(dataset):
    torch.manual_seed(0)
    np.random.seed(0)
    ours, theirs = make(HeartTrainer, dataset), make(nnUNetTrainer, dataset)
    (dl_ours, val_ours), (dl_theirs, val_theirs) = ours.get_dataloaders(), theirs.get_dataloaders()
    assert isinstance(dl_ours.data_loader, HeartDataLoader)
    reference = next(dl_theirs)
    for _ in range(4):
        raw = next(dl_ours)
        assert set(raw) >= {"data", "target", "offsets", "params", "keys", "enlarged_shape"}
        assert all(d.dtype == torch.float32 and t.dtype == torch.int8 for d, t in zip(raw["data"], raw["target"]))
        batch = ours.augment_on_device(raw)
        assert batch["data"].shape == reference["data"].shape and batch["data"].dtype == reference["data"].dtype
        assert [t.shape for t in batch["target"]] == [t.shape for t in reference["target"]]
        assert [t.dtype for t in batch["target"]] == [t.dtype for t in reference["target"]]
        assert set(batch["target"][0].unique().tolist()) <= {0, 1, 2, 3}
    # validation keeps nnU-Net's loader and transforms
    v_ours, v_theirs = next(val_ours), next(val_theirs)
    assert type(val_ours.data_loader) is type(val_theirs.data_loader)
    assert v_ours["data"].shape == v_theirs["data"].shape


def test_boxes_equal_the_enlarged_patch_at_the_same_place(dataset, monkeypatch):
    """Each worker box, augmented, equals the augmentation of the enlarged patch nnU-Net's loader
    cuts at the same place (including the padding beyond a case's border)."""
    trainer = make(HeartTrainer, dataset)
    loader, _ = trainer.get_dataloaders()
    heart_loader = loader.data_loader
    placed = []
    get_bbox = heart_loader.get_bbox

    def recording_get_bbox(*args, **kwargs):
        lbs, ubs = get_bbox(*args, **kwargs)
        placed.append(lbs)
        return lbs, ubs

    monkeypatch.setattr(heart_loader, "get_bbox", recording_get_bbox)
    aug = trainer.augmentation
    S = [int(s) for s in heart_loader.patch_size]
    for attempt in range(6):
        placed.clear()
        batch = next(loader)
        params = batch["params"]
        params["spatial"][attempt % 3] = True  # some rotated and scaled samples in every batch
        params["angles"][attempt % 3] = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
        params["scale"][attempt % 3] = 0.8
        # re-cut the boxes for the changed parameters as the worker would
        enlarged_data, enlarged_seg, boxes_data, boxes_seg, offsets = [], [], [], [], []
        for j, key in enumerate(batch["keys"]):
            image, seg, _, _ = heart_loader._data.load_case(key)
            bbox = [[lb, lb + s] for lb, s in zip(placed[j], S)]
            enlarged_data.append(torch.from_numpy(crop_and_pad_nd(image, bbox, 0)).float())
            enlarged_seg.append(torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)))
            box = aug.sample_box(params, j, S)
            cut = [[lb + lo, lb + hi] for lb, (lo, hi) in zip(placed[j], box)]
            boxes_data.append(torch.from_numpy(crop_and_pad_nd(image, cut, 0)).float())
            boxes_seg.append(torch.from_numpy(crop_and_pad_nd(seg, cut, -1, cast_cropped_to=np.int8)))
            offsets.append([lo for lo, _ in box])
        torch.manual_seed(attempt)
        full = aug.apply(torch.stack(enlarged_data), torch.stack(enlarged_seg), params)
        torch.manual_seed(attempt)
        cut = aug.apply_boxes(boxes_data, boxes_seg, offsets, S, params)
        # the box's grid is normalised to the box, not the enlarged patch: float rounding apart
        assert (cut[0] - full[0]).abs().max() <= 1e-4 * full[0].abs().max(), attempt
        for a, b in zip(cut[1], full[1]):
            assert (a != b).float().mean() <= 2e-3


def test_unsupported_configurations_keep_nnunets_augmentation(dataset, capsys):
    trainer = make(HeartTrainer, dataset)
    assert unsupported_reason(trainer, PATCH, False) is None
    assert "2D" in unsupported_reason(trainer, PATCH[1:], False)
    assert "dummy-2D" in unsupported_reason(trainer, PATCH, True)
    trainer.is_cascaded = True
    assert "cascade" in unsupported_reason(trainer, PATCH, False)
    trainer.is_cascaded = False
    trainer.configuration_manager.configuration["use_mask_for_norm"] = [True]
    assert "masked" in unsupported_reason(trainer, PATCH, False)
    loader, _ = trainer.get_dataloaders()
    assert not isinstance(loader.data_loader, HeartDataLoader) and trainer.augmentation is None
    assert "does not cover normalisation masked" in capsys.readouterr().out
    batch = next(loader)
    assert "params" not in batch and batch["data"].shape[2:] == tuple(PATCH)


def test_nnunet_da_variant_is_nnunets_path(dataset):
    trainer = make(HeartTrainer_nnUNetDA, dataset)
    loader, _ = trainer.get_dataloaders()
    assert not isinstance(loader.data_loader, HeartDataLoader)
    batch = next(loader)
    assert "params" not in batch and batch["data"].shape[2:] == tuple(PATCH)
    assert trainer.train_step.__func__ is HeartTrainer.train_step  # passes nnU-Net's batches through


def test_without_class_weights_the_loader_draws_as_nnunet(dataset):
    """No foreground_class_weights: nnU-Net's case draw (uniform) and class draw (inside get_bbox)."""
    trainer = make(HeartTrainer, dataset)
    loader, _ = trainer.get_dataloaders()
    heart_loader = loader.data_loader
    assert heart_loader.class_weights is None and heart_loader.sampling_probabilities is None
    assert heart_loader.choose_class({1: [[0, 1, 1, 1]], 2: [[0, 2, 2, 2]]}) is None


def test_class_weights_favour_the_rare_classes(dataset):
    """Weighted draw: each case with probability proportional to the largest weight among the classes
    it holds (read from its class_locations), each forced-foreground sample centred on a class present
    in the case with probability proportional to its weight."""
    trainer = make(HeartTrainer, dataset)
    trainer.foreground_class_weights = {1: 1.0, 2: 2.0, 3: 8.0}
    loader, _ = trainer.get_dataloaders()
    heart_loader = loader.data_loader
    held = [[k for k, v in heart_loader._data.load_case(key)[3]["class_locations"].items() if len(v)]
            for key in heart_loader.indices]
    expected = np.array([max(trainer.foreground_class_weights[k] for k in classes) for classes in held])
    np.testing.assert_allclose(heart_loader.sampling_probabilities, expected / expected.sum())

    class Cases:  # cases holding different classes
        identifiers = ["a", "b", "c", "d"]
        held = dict(a=(1, 2), b=(1, 2, 3), c=(), d=(1,))

        def load_case(self, key):
            return None, None, None, {"class_locations": {k: np.ones((2 if k in self.held[key] else 0, 4))
                                                          for k in (1, 2, 3)}}

    np.testing.assert_allclose(HeartDataLoader.case_probabilities(Cases(), {2: 2.0, 3: 8.0}),
                               np.array([2, 8, 1, 1]) / 12)

    np.random.seed(0)
    locations = {1: np.ones((5, 4)), 2: np.ones((3, 4)), 3: np.ones((1, 4))}
    draws = np.bincount([heart_loader.choose_class(locations) for _ in range(6000)], minlength=4)[1:] / 6000
    np.testing.assert_allclose(draws, np.array([1, 2, 8]) / 11, atol=0.02)
    assert heart_loader.choose_class({1: np.ones((5, 4)), 2: np.zeros((0, 4)), 3: np.zeros((0, 4))}) == 1
    assert heart_loader.choose_class({1: np.zeros((0, 4))}) is None

    # the forced samples are centred on the chosen class: every batch of forced samples holds it
    heart_loader.oversample_foreground_percent = 1.0
    heart_loader.class_weights = {1: 1e-6, 2: 1e-6, 3: 1.0}
    for _ in range(4):
        batch = next(loader)
        for key, seg in zip(batch["keys"], batch["target"]):
            has_calcium = len(heart_loader._data.load_case(key)[3]["class_locations"][3]) > 0
            assert not has_calcium or (seg == 3).any()


def test_class_weights_are_checked(dataset):
    trainer = make(HeartTrainer, dataset)
    for bad in ({4: 1.0}, {2: 0.0}, {0: 1.0}):
        trainer.foreground_class_weights = bad
        with pytest.raises(ValueError, match="class_weights"):
            trainer.get_dataloaders()


def test_optimizer_choice(dataset):
    trainer = make(HeartTrainer, dataset)
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.SGD)  # nnU-Net's
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        trainer.optimizer_name = name
        optimizer, scheduler = trainer.configure_optimizers()
        assert isinstance(optimizer, cls) and optimizer.param_groups[0]["lr"] == trainer.initial_lr
        scheduler.step(trainer.num_epochs // 2)  # nnU-Net's poly decay either way
        assert 0 < optimizer.param_groups[0]["lr"] < trainer.initial_lr
    trainer.optimizer_name = "lion"
    with pytest.raises(ValueError, match="optimizer_name"):
        trainer.configure_optimizers()
