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

from nnunet_heart_ext.nnunet import registry
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
        "nnunet_heart_ext.nnunet.planners"
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


def _nnunet_lookups():
    """package -> nnU-Net's own lookup for a name in it (what -tr, -pl and the plans use)."""
    from nnunetv2.preprocessing.resampling.utils import recursive_find_resampling_fn_by_name

    def in_folder(*parts):
        folder = os.path.join(nnunetv2.__path__[0], *parts)
        return lambda name: recursive_find_python_class(folder, name, ".".join(("nnunetv2",) + parts))

    return {registry.TRAINERS: recursive_find_trainer_class_by_name,
            registry.PLANNERS: in_folder("experiment_planning"),
            registry.PREPROCESSORS: in_folder("preprocessing"),
            registry.NORMALIZATION: in_folder("preprocessing", "normalization"),  # as DefaultPreprocessor._normalize
            registry.RESAMPLING: recursive_find_resampling_fn_by_name}


def test_every_registered_name_is_found_by_nnunets_own_lookup():
    lookups = _nnunet_lookups()
    names = registry.names()
    assert {"HeartTrainer", "HeartTrainer_demo", "HeartTrainer_nnUNetLoss_250epochs", "HeartTrainer_nnUNetDA",
            "HeartTrainer_nnUNetDA_demo", "HeartTrainer_tversky", "HeartTrainer_tversky_250epochs", "HeartPlanner",
            "HeartDemoPlanner", "HeartPreprocessor", "HeartCTNormalization", "HeartCTFloorNormalization",
            "resample_data_or_seg_to_shape_numba"} <= set(names)
    for name, package in names.items():
        found = lookups[package](name)
        assert found.__name__ == name and found.__module__.startswith("nnunet_heart_ext."), name
    # a search of a package above also finds it, as nnU-Net's recursive search would
    assert lookups[registry.PREPROCESSORS]("resample_data_or_seg_to_shape_numba").__name__ == \
        "resample_data_or_seg_to_shape_numba"


# Names the extension's modules hold without offering them to nnU-Net (imported functions and
# modules, module-level helpers), and offered names asked for as another kind of object. The
# registry that did getattr over whole modules answered most of them.
NOT_OFFERED = {
    registry.TRAINERS: ["FusedDiceCELoss", "heart_trainer", "_schedules", "resample_data_or_seg_to_shape_numba",
                        "HeartTrainer_", "HeartPlanner"],
    registry.PLANNERS: ["resample_data_or_seg_to_shape_numba", "HeartTrainer", "HeartPreprocessor"],
    registry.PREPROCESSORS: ["crop_to_nonzero_fast", "njit", "coordinates_grouped_by_label", "HeartPlanner"],
    registry.RESAMPLING: ["njit", "prange", "numba", "_resample_axis", "HeartPreprocessor"],
}


def test_names_the_extension_does_not_offer_are_not_found():
    import nnunet_heart_ext.nnunet.preprocessing  # noqa: F401  the modules are loaded: only the table decides
    import nnunet_heart_ext.kernels.resample  # noqa: F401
    import nnunet_heart_ext.nnunet.planners  # noqa: F401

    lookups = _nnunet_lookups()
    for package, names in NOT_OFFERED.items():
        folder = os.path.join(nnunetv2.__path__[0], *package.split(".")[1:])
        for name in names:
            assert recursive_find_python_class.__wrapped__(folder, name, package) is None, f"nnU-Net has {name}"
            assert registry.find_extension_object(name, package) is None, name
            if package in (registry.TRAINERS, registry.RESAMPLING):  # these raise nnU-Net's "not found"
                with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer|Unable to find"):
                    lookups[package](name)
            else:
                assert lookups[package](name) is None, name
    assert registry.find_extension_object("HeartTrainer", None) is None  # nnUNet_extTrainer folders


@pytest.mark.slow
def test_train_command_does_not_find_an_imported_function(tmp_path):
    """`nnUNetv2_train -tr <a function planners.py imports>` ends in nnU-Net's own "not
    found", before it reads any dataset."""
    env = {**os.environ, **{k: str(tmp_path) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), "100", "3d_fullres",
                          "0", "-tr", "resample_data_or_seg_to_shape_numba", "-device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    not_found = "Could not find requested nnunet trainer resample_data_or_seg_to_shape_numba"
    assert out.returncode != 0 and not_found in out.stderr, out.stderr[-2000:]


def test_plans_written_before_the_kernels_lost_their_adapters_still_load():
    """HeartPlans written while resample_data_or_seg_to_shape_numba lived in the kernel module
    store only names: nnU-Net's plans manager resolves each to the extension's object."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_heart_ext.nnunet.planners import HeartPlanner
    from nnunet_heart_ext.nnunet.preprocessing import HeartPreprocessor
    from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba

    kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "HeartPlans_3d_fullres", "preprocessor_name": "HeartPreprocessor",
        "resampling_fn_data": "resample_data_or_seg_to_shape_numba", "resampling_fn_data_kwargs": kwargs,
        "resampling_fn_seg": "resample_data_or_seg_to_shape_numba",
        "resampling_fn_seg_kwargs": dict(kwargs, is_seg=True, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape_numba",
        "resampling_fn_probabilities_kwargs": dict(kwargs, order=1),
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}
    plans = PlansManager({"dataset_name": "Dataset100_Heart", "plans_name": "HeartPlans",
                          "experiment_planner_used": "HeartPlanner", "configurations": {"3d_fullres": configuration}})
    manager = plans.get_configuration("3d_fullres")
    assert manager.preprocessor_class is HeartPreprocessor
    assert plans.experiment_planner_class is HeartPlanner
    for fn in (manager.resampling_fn_data, manager.resampling_fn_seg, manager.resampling_fn_probabilities):
        assert fn.func is resample_data_or_seg_to_shape_numba
    assert manager.resampling_fn_seg.keywords["is_seg"] is True
