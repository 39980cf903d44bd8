"""The import hook and the registry, in this process and in fresh interpreters."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest

import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_heart_ext import registry
from nnunet_heart_ext.trainers import HeartTrainer, schedules


def test_nnunet_finds_every_schedule_variant():
    for base, suffix in itertools.product(schedules.BASES, schedules.SCHEDULES):
        cls = recursive_find_trainer_class_by_name(f"{base.__name__}_{suffix}")
        assert cls.__name__ == f"{base.__name__}_{suffix}" and issubclass(cls, base)
        assert cls.__module__ == "nnunet_heart_ext.trainers.schedules"
        assert getattr(schedules, cls.__qualname__) is cls  # importable by name (pickling, checkpoints)


def test_schedule_variant_sets_its_attributes_after_the_base_init():
    class Base:
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            self.args = (plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1000

    variant = schedules.make_schedule_variant(Base, "7epochs", {"num_epochs": 7, "save_every": 3})
    trainer = variant({"p": 1}, "3d_fullres", 2, {"d": 1}, "cpu")
    assert variant.__name__ == "Base_7epochs" and issubclass(variant, Base)
    assert trainer.args == ({"p": 1}, "3d_fullres", 2, {"d": 1}, "cpu")
    assert (trainer.num_epochs, trainer.save_every) == (7, 3)


def test_nnunet_own_names_still_win_and_unknown_names_still_fail():
    folder = os.path.join(nnunetv2.__path__[0], "experiment_planning")
    planner = recursive_find_python_class(folder, "ExperimentPlanner", "nnunetv2.experiment_planning")
    assert planner.__module__.startswith("nnunetv2.")
    assert recursive_find_python_class(folder, "HeartPlanner", "nnunetv2.experiment_planning").__module__ == \
        "nnunet_heart_ext.planners"
    assert recursive_find_python_class(folder, "NoSuchPlanner", "nnunetv2.experiment_planning") is None
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("NoSuchTrainer")


def test_trainer_names_are_unique_across_nnunet():
    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    original = recursive_find_python_class.__wrapped__
    for name in ["HeartTrainer", "HeartTrainer_nnUNetLoss", *schedules.__all__]:
        assert original(folder, name, "nnunetv2.training.nnUNetTrainer") is None, name


def test_hook_is_disabled_by_env_and_patches_spawned_interpreters(tmp_path):
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "print(f('HeartTrainer_demo').__name__)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "HeartTrainer_demo", found.stderr
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "NNUNET_HEART_EXT_DISABLE": "1"})
    assert off.returncode != 0 and "Could not find requested nnunet trainer" in off.stderr
    # A spawn-started worker (nnU-Net's preprocessing and export pools) resolves names too.
    script = tmp_path / "spawned.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp
        def lookup(name):
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            return recursive_find_trainer_class_by_name(name).__name__
        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(1) as pool:
                print(pool.map(lookup, ["HeartTrainer_250epochs"])[0])
    """))
    spawned = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert spawned.stdout.strip().endswith("HeartTrainer_250epochs"), spawned.stderr


def test_user_trainers_through_nnUNet_extTrainer_keep_working(tmp_path, monkeypatch):
    folder = tmp_path / "my_trainers"
    folder.mkdir()
    (folder / "mine.py").write_text(textwrap.dedent("""
        from nnunet_heart_ext.trainers import HeartTrainer
        class MyHeartTrainer(HeartTrainer):
            pass
    """))
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "c = f('MyHeartTrainer'); print(c.__name__, c.__mro__[1].__name__)")
    env = {**os.environ, "nnUNet_extTrainer": str(folder)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "MyHeartTrainer HeartTrainer"


def test_registry_skips_only_modules_that_do_not_exist(monkeypatch):
    monkeypatch.setattr(registry, "EXTENSION_MODULES", ("nnunet_heart_ext.not_written_yet",
                                                        "nnunet_heart_ext.planners"))
    assert registry.find_extension_object("HeartDemoPlanner").__name__ == "HeartDemoPlanner"
    assert registry.find_extension_object("Nothing") is None
