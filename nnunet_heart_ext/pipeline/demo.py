"""The demo (`--demo`): its settings and its rule for the fold it trains.

`DEMO` gives the phantom's size and the demo's defaults of the options (option_table.py shows
them in --help and options.py applies them); `demo_fold` chooses the fold from nnU-Net's own
split of the phantom's cases.
"""
from nnunet_heart_ext.pipeline.nnunet_outputs import nnunet_split

DEMO_WORK_DEFAULT = "nnunet_demo"
DEMO = dict(n_train=24, n_test=4, folds="0", parallel=1, planner="HeartDemoPlanner", plans="HeartDemoPlans",
            trainer="HeartTrainer_demo")


def demo_fold(seed: int) -> int:
    """The fold the demo trains: of nnU-Net's default split of the phantom's training cases, the one
    that trains on the most calcified cases while its validation still holds one (ties: the lowest
    fold). nnUNetv2_find_best_configuration ranks models by the mean foreground Dice of the
    validation cases; a label absent from all of them makes that mean NaN and the command fails
    (IndexError). Calcium is what the fewest cases hold: the first fold with a calcified validation
    case trained on a single calcified case on some seeds, and its calcium did not generalise."""
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.data.phantom import calcified_training_cases

    calcified = set(calcified_training_cases(DEMO["n_train"], DEMO["n_test"], seed))
    cases = [ds.case_id(i) for i in range(1, DEMO["n_train"] + 1)]
    best, most = int(DEMO["folds"]), -1
    for fold, split in enumerate(nnunet_split(cases)):
        trained = len(calcified & {str(c) for c in split["train"]})
        if calcified & {str(c) for c in split["val"]} and trained > most:
            best, most = fold, trained
    return best
